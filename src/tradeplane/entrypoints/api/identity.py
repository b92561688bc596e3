"""Who am I, and the admin's view of users."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from tradeplane.entrypoints.api.deps import PlatformDep, PrincipalDep
from tradeplane.services.identity import Role

router = APIRouter(prefix="/api/v1", tags=["identity"])


class PrincipalPublic(BaseModel):
    user_id: int
    username: str
    role: Role


class UserPublic(BaseModel):
    id: int
    username: str
    email: str | None
    role: Role
    is_active: bool
    created_at: datetime


@router.get("/me", response_model=PrincipalPublic)
async def me(principal: PrincipalDep) -> PrincipalPublic:
    return PrincipalPublic(user_id=principal.user_id, username=principal.username, role=principal.role)


@router.get("/users", response_model=list[UserPublic])
async def list_users(principal: PrincipalDep, platform: PlatformDep) -> list[UserPublic]:
    principal.require(Role.ADMIN)
    async with platform.db.connection("users.list") as conn:
        rows = await conn.fetch(
            "SELECT id, username, email, role, is_active, created_at FROM users ORDER BY id LIMIT 1000"
        )
    return [UserPublic(**dict(row)) for row in rows]
