"""GET/PUT/DELETE /overrides/{tier}: operator caps and pinned rates, kept in Redis and audited."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status

from controller.api.deps import ControllerDep, Reader, TierDep, Writer
from controller.overrides import Override, OverrideRequest

router = APIRouter(prefix="/overrides", tags=["overrides"])


@router.get("", dependencies=[Reader])
def list_overrides(controller: ControllerDep) -> dict[str, Override]:
    """Every tier's stored override."""
    return {tier: o for tier in controller.settings.tier_names if (o := controller.overrides.get(tier)) is not None}


@router.get("/{tier}", dependencies=[Reader])
def get_override(controller: ControllerDep, tier: TierDep) -> Override:
    """A tier's override; 404 when it has none."""
    override = controller.overrides.get(tier)
    if override is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"tier {tier!r} has no override")
    return override


@router.put("/{tier}", dependencies=[Writer])
def put_override(controller: ControllerDep, tier: TierDep, body: OverrideRequest) -> Override:
    """Set (replace) a tier's caps and/or pinned rate; applies from the next tick."""
    return controller.overrides.put(tier, body)


@router.delete("/{tier}", dependencies=[Writer])
def delete_override(
    controller: ControllerDep,
    tier: TierDep,
    who: Annotated[str, Query(min_length=1, max_length=100)],
    reason: Annotated[str, Query(min_length=1, max_length=500)],
) -> dict[str, Any]:
    """Remove a tier's override (audited); 404 when it has none."""
    if not controller.overrides.delete(tier, who, reason):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"tier {tier!r} has no override")
    return {"tier": tier, "deleted": True}


@router.get("/{tier}/audit", dependencies=[Reader])
def audit(
    controller: ControllerDep, tier: TierDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[dict[str, Any]]:
    """Who changed the tier's override, when and why, newest first."""
    return controller.overrides.audit(tier, limit)
