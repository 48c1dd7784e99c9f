"""POST /policy/reload and POST /mode: swap the policy without a restart, switch active/shadow."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controller.api.deps import ControllerDep, Writer
from controller.policies import PolicyLoadError
from controller.settings import PolicyParam, PolicyParamName, PolicySettings

router = APIRouter(tags=["policy"], dependencies=[Writer])


class ReloadRequest(BaseModel):
    """Which policy to load; omitted fields keep the current settings (an empty body reloads the same model)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")
    model: str | None = Field(default=None, min_length=1, max_length=1000)
    params: dict[PolicyParamName, PolicyParam] | None = Field(default=None, max_length=32)


class ModeRequest(BaseModel):
    """The mode every replica follows: active writes rates, shadow only logs decisions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["active", "shadow"]


@router.post("/policy/reload")
def reload_policy(controller: ControllerDep, body: Annotated[ReloadRequest | None, Body()] = None) -> dict[str, Any]:
    """Load the policy again (or another one); a failure answers 422 and keeps the policy in force."""
    current = controller.policies.settings
    wanted = current
    if body is not None:
        changes = body.model_dump(exclude_none=True)
        if "name" in changes and changes["name"] != "rl" and "model" not in changes:
            changes["model"] = None
        try:
            wanted = PolicySettings.model_validate({**current.model_dump(), **changes})
        except ValidationError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc.errors()[0]["msg"])) from None
    try:
        loaded = controller.policies.reload(wanted)
    except PolicyLoadError as exc:
        controller.metrics.errors.labels("model_load").inc()
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"policy not reloaded, the one in force stays: {exc}"
        ) from None
    return loaded.describe()


@router.post("/mode")
def set_mode(controller: ControllerDep, body: ModeRequest) -> dict[str, str]:
    """Switch all replicas to active or shadow from the next tick (kept in Redis)."""
    controller.store.set_mode(body.mode)
    return {"mode": body.mode}
