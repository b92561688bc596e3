"""Pure trading logic: values, orders, the order book and matching, risk, ledger, candles.

Everything under this package imports only the standard library (an import-linter contract enforces it), so
it runs the same in the engine, in the API and in tests, with no server behind it.
"""
