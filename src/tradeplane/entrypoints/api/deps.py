"""Dependency aliases used at the API edge only."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tradeplane.bootstrap import Platform
from tradeplane.errors import AuthenticationFailed
from tradeplane.services.identity import Principal


async def get_platform(request: Request) -> Platform:
    # async, not def: FastAPI runs a plain-def dependency in a worker thread, a thread hop on every request
    platform: Platform = request.app.state.platform
    return platform


async def get_principal(request: Request) -> Principal:
    return await principal_of(request.app.state.platform, request.headers.get("authorization", ""))


async def principal_of(platform: Platform, authorization: str) -> Principal:
    """The principal of an ``Authorization`` header's value (AuthenticationFailed if it names none)."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationFailed("send the API key as 'Authorization: Bearer <key>'", code="missing_api_key")
    return await platform.authenticator.authenticate(platform.db.pool, key.strip())


PlatformDep = Annotated[Platform, Depends(get_platform)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
