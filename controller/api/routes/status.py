"""GET /status: policy, model, the candidate in shadow, mode, leadership, the last tick and each tier's rate, observation and rule."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from redis import RedisError

from controller.api.deps import ControllerDep, Reader
from controller.rate_store import MODE_KEY

router = APIRouter(tags=["status"], dependencies=[Reader])


@router.get("/status")
def status(controller: ControllerDep) -> dict[str, Any]:
    """What the controller is doing right now."""
    try:
        stored = controller.redis.get(MODE_KEY)
        mode = stored.decode() if stored else controller.settings.loop.mode
        redis_error = None
    except RedisError as exc:
        mode, redis_error = controller.settings.loop.mode, str(exc)
    last = controller.loop.last_report
    leader_report = controller.loop.last_leader_report
    return {
        "replica": controller.settings.replica_id,
        "mode": mode,
        "leader": controller.lease.is_leader(),
        "fence": controller.lease.token() or None,
        "policy": controller.policies.current.describe(),
        "policy_error": controller.policies.last_error,
        "candidate": None if controller.shadow.current is None else controller.shadow.current.describe(),
        "candidate_error": controller.shadow.last_error,
        "redis_error": redis_error,
        "last_tick": None if last is None else last.summary(),
        "last_leader_tick": None if leader_report is None else leader_report.summary(),
        "tiers": {} if leader_report is None else leader_report.tiers,
    }
