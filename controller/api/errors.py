"""The admin API's 422 answer: FastAPI's validation detail, made JSON-safe.

FastAPI echoes the offending input back in each error; a body holding `NaN`, `Infinity` or
`1e309` (which Python's JSON reader turns into a non-finite float) would make that echo invalid
JSON and the answer a 500. Here non-finite numbers are echoed as the text JSON would need
(`"NaN"`, `"Infinity"`, `"-Infinity"`), so the client gets the 422 naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def json_safe(value: Any) -> Any:
    """`value` (already jsonable) with every non-finite float replaced by its JavaScript spelling."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


async def validation_failed(request: Request, exc: Exception) -> JSONResponse:
    """422 with FastAPI's usual `detail` list (loc names the field), nothing stored."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else [{"msg": str(exc)}]
    return JSONResponse({"detail": json_safe(jsonable_encoder(errors))}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
