"""Settings are validated at start and a bad value is one line naming the setting."""

from __future__ import annotations

import pytest

from tradeplane.config import load_settings
from tradeplane.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TRADEPLANE_") and not name.startswith("TRADEPLANE_TEST_"):
            monkeypatch.delenv(name)


def test_defaults_need_no_configuration() -> None:
    settings = load_settings()
    assert settings.embedded
    assert settings.api_port == 8000
    assert str(settings.data_dir) == ".tradeplane"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        (
            "TRADEPLANE_DATABASE_URL",
            "mysql://localhost/x",
            "TRADEPLANE_DATABASE_URL: must start with postgresql://",
        ),
        ("TRADEPLANE_DATABASE_URL", "postgresql://localhost:99999/x", "malformed port"),
        ("TRADEPLANE_REDIS_URL", "http://localhost", "TRADEPLANE_REDIS_URL: must start with redis://"),
        ("TRADEPLANE_BUS_URL", "kafka://localhost", "TRADEPLANE_BUS_URL: must start with nats://"),
        ("TRADEPLANE_API_PORT", "70000", "TRADEPLANE_API_PORT"),
        ("TRADEPLANE_LOG_LEVEL", "LOUD", "TRADEPLANE_LOG_LEVEL"),
        ("TRADEPLANE_BUS_NAMESPACE", "desk one", "TRADEPLANE_BUS_NAMESPACE: namespace must be 0-32 letters"),
        ("TRADEPLANE_BUS_NAMESPACE", "x" * 33, "TRADEPLANE_BUS_NAMESPACE"),
    ],
)
def test_malformed_setting_is_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert fragment in info.value.detail
    assert "\n" not in info.value.detail


def test_placeholder_secret_refused_outside_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADEPLANE_ENV", "production")
    with pytest.raises(ConfigError, match="TRADEPLANE_SECRET_KEY"):
        load_settings()
    monkeypatch.setenv("TRADEPLANE_SECRET_KEY", "a1f0e7c2d9b84f6aa3c5e8d7f1b2c3d4")
    assert load_settings().env.value == "production"


def test_bus_kind_follows_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADEPLANE_BUS_URL", "amqp://guest:guest@localhost:5672/")
    assert load_settings().bus_kind == "amqp"
    monkeypatch.setenv("TRADEPLANE_BUS_URL", "nats://localhost:4222")
    assert load_settings().bus_kind == "nats"


def test_missing_urls_are_named() -> None:
    with pytest.raises(ConfigError, match="TRADEPLANE_DATABASE_URL, TRADEPLANE_REDIS_URL, TRADEPLANE_BUS_URL"):
        load_settings().require_urls()


def test_bus_namespace_defaults_to_the_plain_seed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().bus_namespace == ""
    monkeypatch.setenv("TRADEPLANE_BUS_NAMESPACE", "desk-2")
    assert load_settings().bus_namespace == "desk-2"
