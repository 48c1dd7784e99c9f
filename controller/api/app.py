"""The admin API app: routers per resource, a 503 for Redis outages, the controller started in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import RedisError

from controller.api.errors import validation_failed
from controller.api.routes import console, decisions, health, overrides, policy, shadow
from controller.api.routes import status as status_routes
from controller.runtime import Controller


def create_app(controller: Controller, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI app serving `controller`; with manage_lifecycle it starts and stops the loop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            controller.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                controller.stop()

    app = FastAPI(
        title="ratepilot controller",
        summary="Admin API of the adaptive rate-limit controller",
        version="1",
        lifespan=lifespan,
    )
    app.state.controller = controller
    for module in (health, status_routes, decisions, shadow, overrides, policy, console):
        app.include_router(module.router)

    app.add_exception_handler(RequestValidationError, validation_failed)

    @app.exception_handler(RedisError)
    async def redis_unavailable(request: Request, exc: RedisError) -> JSONResponse:
        return JSONResponse(
            {"detail": f"redis unavailable, nothing changed: {type(exc).__name__}"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    return app
