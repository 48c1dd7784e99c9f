"""Typed dependencies of the admin API: the controller, and bearer-token checks for writes and reads."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller.runtime import Controller
from controller.settings import TIER_NAME

bearer = HTTPBearer(auto_error=False, description="the admin token (admin.token or RATEPILOT_ADMIN_TOKEN)")


def get_controller(request: Request) -> Controller:
    """The controller this app serves."""
    return request.app.state.controller  # type: ignore[no-any-return]


ControllerDep = Annotated[Controller, Depends(get_controller)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def _check(controller: Controller, credentials: HTTPAuthorizationCredentials | None) -> None:
    token = controller.settings.admin.token
    if token is None:
        raise _unauthorized("writes are disabled: no admin token is configured (admin.token or RATEPILOT_ADMIN_TOKEN)")
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise _unauthorized("missing or wrong bearer token")


def require_writer(controller: ControllerDep, credentials: Credentials) -> None:
    """401 unless the request carries the admin bearer token."""
    _check(controller, credentials)


def require_reader(controller: ControllerDep, credentials: Credentials) -> None:
    """401 when reads are protected (admin.protect_reads) and the token is missing or wrong."""
    if controller.settings.admin.protect_reads:
        _check(controller, credentials)


Writer = Depends(require_writer)
Reader = Depends(require_reader)


def known_tier(controller: ControllerDep, tier: Annotated[str, Path(pattern=TIER_NAME.pattern, max_length=64)]) -> str:
    """The path's tier, 404 when the controller does not manage it."""
    if tier not in controller.settings.tiers:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown tier {tier!r}; known: {controller.settings.tier_names[:20]}")
    return tier


TierDep = Annotated[str, Depends(known_tier)]
