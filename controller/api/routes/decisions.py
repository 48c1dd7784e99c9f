"""GET /decisions: the latest decisions from the ratepilot:decisions stream."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from controller.api.deps import ControllerDep, Reader
from controller.settings import TIER_NAME

router = APIRouter(tags=["decisions"], dependencies=[Reader])


@router.get("/decisions")
def decisions(
    controller: ControllerDep,
    tier: Annotated[str | None, Query(pattern=TIER_NAME.pattern, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[dict[str, Any]]:
    """Newest first: observation, proposed rate and action, clamped rate, rules fired; optionally one tier."""
    return controller.decisions.recent(tier, limit)
