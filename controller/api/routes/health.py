"""GET /health and GET /metrics: always open (probes and Prometheus scrape them)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.api.deps import ControllerDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health(controller: ControllerDep) -> dict[str, Any]:
    """Liveness: the process answers; says whether the loop runs and this replica leads."""
    report = controller.loop.last_report
    return {
        "status": "ok",
        "replica": controller.settings.replica_id,
        "running": controller.running,
        "leader": controller.lease.is_leader(),
        "last_tick_age_s": None if report is None else max(0.0, time.time() - report.started_at),
    }


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(controller: ControllerDep) -> Response:
    """The controller's Prometheus metrics."""
    return Response(generate_latest(controller.metrics.registry), media_type=CONTENT_TYPE_LATEST)
