"""The operator's web console: GET /console (one HTML page and its script) and GET /tiers (the tier caps).

The page holds no data of its own: its script calls the admin API (`/status`, `/health`, `/tiers`,
`/overrides`, `/decisions`, the audit, and the writes) with the token the operator types in, so the
console follows exactly the API's token rules (reads public or protected as configured, writes
always protected). No build step and no CDN: the HTML, script and stylesheet are package files.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from string import Template
from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from controller.api.deps import ControllerDep, Reader

router = APIRouter(tags=["console"])

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}  # the only files served
REFRESH_S = 2.0  # how often the open page polls the API
# everything comes from this server: no CDN, no inline script, nothing to load from elsewhere
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    """The console is the admin API's front page."""
    return RedirectResponse("/console")


@router.get("/console", response_class=HTMLResponse)
def console(controller: ControllerDep) -> HTMLResponse:
    """The console page; it reads and writes through the API with the operator's token."""
    page = Template((CONSOLE_DIR / "index.html").read_text(encoding="utf-8"))
    text = page.substitute(
        refresh_ms=str(int(REFRESH_S * 1000)),
        protect_reads="true" if controller.settings.admin.protect_reads else "false",
        writes_enabled="true" if controller.settings.admin.token is not None else "false",
        title=escape(f"ratepilot controller {controller.settings.replica_id}"),
    )
    return HTMLResponse(text, headers=SECURITY_HEADERS)


@router.get("/console/{asset}", include_in_schema=False)
def console_asset(asset: str) -> FileResponse:
    """The console's script and stylesheet (nothing else from the folder)."""
    if asset not in ASSETS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no console file {asset!r}")
    return FileResponse(CONSOLE_DIR / asset, media_type=ASSETS[asset], headers={"cache-control": "no-cache"})


@router.get("/tiers", dependencies=[Reader], tags=["status"])
def tiers(controller: ControllerDep) -> dict[str, dict[str, Any]]:
    """Each managed tier's configured rates (tokens/s), burst (s) and p99 objective (ms)."""
    return {name: tier.model_dump() for name, tier in controller.settings.tiers.items()}
