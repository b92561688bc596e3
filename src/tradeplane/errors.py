"""The exception tree. Every error the platform raises on purpose derives from TradeplaneError.

    TradeplaneError                    500 internal        base: carries an HTTP status and a machine code
    ├── ConfigError                    500 config          a setting is malformed or refused (CLI exits 2)
    ├── InfrastructureUnavailable      503 unavailable     PostgreSQL, Redis or the bus cannot be reached
    ├── AuthenticationFailed           401 unauthenticated no API key, or a key that does not verify
    ├── PermissionDenied               403 forbidden       the key's role may not do this
    ├── NotFound                       404 not_found       the resource does not exist or is not yours
    ├── Conflict                       409 conflict        the request contradicts stored state
    └── InvalidRequest                 422 invalid         well-formed but unacceptable input

The API renders any of them as {"error": code, "detail": text}; the CLI prints the detail and exits non-zero.
A risk denial is not an exception: it is a rejected order carrying a reason (see domain).
"""

from __future__ import annotations


class TradeplaneError(Exception):
    status_code: int = 500
    code: str = "internal"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class ConfigError(TradeplaneError):
    code = "config"


class InfrastructureUnavailable(TradeplaneError):
    status_code = 503
    code = "unavailable"


class AuthenticationFailed(TradeplaneError):
    status_code = 401
    code = "unauthenticated"


class PermissionDenied(TradeplaneError):
    status_code = 403
    code = "forbidden"


class NotFound(TradeplaneError):
    status_code = 404
    code = "not_found"


class Conflict(TradeplaneError):
    status_code = 409
    code = "conflict"


class InvalidRequest(TradeplaneError):
    status_code = 422
    code = "invalid"
