"""Health: the database answers; which code version runs, embedded or not, and where its home is."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import CallerDep, SessionDep
from api.schemas import errors
from core.settings import get_settings
from core.version import code_version

router = APIRouter(tags=["health"])


@router.get("/health", responses=errors(503))
def health(session: SessionDep, caller: CallerDep) -> dict[str, Any]:
    session.execute(text("SELECT 1"))
    s = get_settings()
    return {"ok": True, "code_version": code_version(), "embedded": s.embedded, "home": str(s.home)}
