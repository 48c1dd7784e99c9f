"""GET /shadow: the candidate in shadow against the champion, from the latest decisions of the stream."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from controller.api.deps import ControllerDep, Reader
from controller.settings import TIER_NAME
from controller.shadow_report import DEFAULT_THRESHOLD, compare

router = APIRouter(tags=["shadow"], dependencies=[Reader])


@router.get("/shadow")
def shadow(
    controller: ControllerDep,
    tier: Annotated[str | None, Query(pattern=TIER_NAME.pattern, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    threshold: Annotated[float, Query(gt=0, le=10, allow_inf_nan=False)] = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """The candidate now, and over the latest `limit` decisions: share differing, ratios, incidents."""
    candidate = controller.shadow.current
    return {
        "candidate": None if candidate is None else candidate.describe(),
        "candidate_error": controller.shadow.last_error,
        "read": limit,
        **compare(controller.decisions.recent(tier, limit), threshold),
    }
