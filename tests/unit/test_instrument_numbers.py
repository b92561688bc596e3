"""What an operator may type for a number at `tradeplane instruments add|set`: plain ASCII decimals only."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tradeplane.errors import InvalidRequest
from tradeplane.services.instruments import InstrumentTerms, parse_decimal, validate_terms


@pytest.mark.parametrize(
    ("text", "value"),
    [("0.0005", "0.0005"), (" -1.50 ", "-1.5"), ("5e-4", "0.0005"), ("+2", "2"), (".5", "0.5"), ("1000", "1000")],
)
def test_plain_ascii_decimals_are_read_exactly(text: str, value: str) -> None:
    assert parse_decimal(text, "tick size") == Decimal(value)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("1_000", "without '_' separators"),
        ("0.000_5", "without '_' separators"),
        ("\uff11\uff10", "ASCII digits"),  # full-width 10
        ("\u0661\u0660", "ASCII digits"),  # Arabic-Indic 10
        ("\u00a00.5", "ASCII digits"),  # no-break space before it
        ("0.5\u3000", "ASCII digits"),  # ideographic space after it
        ("0.5\u2003", "ASCII digits"),  # em space
    ],
)
def test_what_decimal_reads_but_an_operator_should_not_type_is_refused(text: str, hint: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_decimal(text, "taker fee rate")
    assert refused.value.code == "invalid_number"
    assert f"taker fee rate {text!r} is not a decimal number" in str(refused.value)
    assert hint in str(refused.value)


@pytest.mark.parametrize("text", ["NaN", "inf", "-Infinity"])
def test_non_finite_values_say_so(text: str) -> None:
    with pytest.raises(InvalidRequest, match="must be a finite number"):
        parse_decimal(text, "price band")


def terms(symbol: str = "SOL-USD", base: str = "SOL", quote: str = "USD") -> InstrumentTerms:
    one = Decimal(1)
    return InstrumentTerms(symbol, base, quote, Decimal("0.01"), one, one, Decimal(100), Decimal(10))


def test_listable_terms_pass() -> None:
    validate_terms(terms())


@pytest.mark.parametrize(
    ("changed", "code"),
    [
        ({"symbol": "SOL-USD\n"}, "invalid_symbol"),
        ({"base": "SOL\n"}, "invalid_asset"),
        ({"quote": "USD\n"}, "invalid_asset"),
    ],
)
def test_a_trailing_newline_is_not_part_of_a_valid_name(changed: dict[str, str], code: str) -> None:
    # re's `$` also matches before a final newline: the rules are full matches
    with pytest.raises(InvalidRequest) as refused:
        validate_terms(terms(**changed))
    assert refused.value.code == code
