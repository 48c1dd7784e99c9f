"""The web console in a real headless Chromium against a served controller with real Redis and Prometheus.

The controller's admin API runs in uvicorn; the test drives the ticks itself so that what the page
must show is known. Chromium is the Debian package (installed by `make setup`), driven through
Playwright's own protocol client without any browser download. A screenshot of the console is kept
in `test-artifacts/` (or $RATEPILOT_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, expect, sync_playwright

from controller.overrides import AUDIT_KEY
from controller.policies import LoadedPolicy
from controller.rate_store import MODE_KEY, OVERRIDES_KEY
from controller.runtime import Controller
from ratepilot.servers import PrometheusServer, RedisServer
from tests.controller.api_server import ApiServer
from tests.controller.policies import LatencyFollower
from tests.controller.support import TOKEN, make_settings

TIERS = {
    "free": {"static_rate": 100, "min_rate": 10, "max_rate": 1000},
    "pro": {"static_rate": 400, "min_rate": 40, "max_rate": 4000},
    "hot": {"static_rate": 200, "min_rate": 20, "max_rate": 2000},
}
# flags for a closed network and a root user; Playwright gives every launch a fresh temporary profile
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(os.environ.get("RATEPILOT_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
TICKS = 6  # before the page opens: a few points in each tier's chart
TIMEOUT_MS = 15_000  # generous: a loaded 2-core machine
expect.set_options(timeout=TIMEOUT_MS)


def chromium_path() -> str:
    """The Debian chromium binary; `make setup` installs it."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        pytest.fail("chromium is not installed: run `make setup` (installs the Debian package chromium)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless Chromium for this module."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def served_controller(redis_url: str, prometheus_url: str, **changes: Any) -> Controller:
    """A leading controller over three tiers, its policy following latency (aimd once reloaded); its lease outlasts the test."""
    settings = make_settings(redis_url, prometheus_url, tiers=TIERS, lease__lease_s=120, lease__renew_deadline_s=60,
                             policy__name="aimd", policy__model=None, **changes)  # fmt: skip
    controller = Controller(settings, LoadedPolicy(LatencyFollower(), "latency_follower"))
    controller.lease.try_acquire_or_renew()
    return controller


@pytest.fixture
def console(
    browser: Browser, redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer
) -> Iterator[tuple[Page, Controller, httpx.Client]]:
    """The console page open on a served controller that has ticked TICKS times."""
    controller = served_controller(redis_server_session.url, prometheus.url)
    for _ in range(TICKS):
        assert controller.loop.tick().result == "written"
    with ApiServer(controller) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        requested: list[str] = []
        script_errors: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.on("pageerror", lambda error: script_errors.append(str(error)))
        page.goto(server.url + "/")
        yield page, controller, client
        page.close()
        assert requested and all(url.startswith(server.url + "/") for url in requested), "the console loaded something from elsewhere"
        assert script_errors == []
    controller.stop()


def rule_label(rule: str, policy: str) -> str:
    """What the console writes for a rule (console.js RULE_NAMES)."""
    return {"none": f"policy ({policy})", "step_limit": "step limit", "pinned": "override: pinned",
            "tier_bounds": "tier bounds", "emergency_brake": "emergency brake"}.get(rule, rule)  # fmt: skip


def test_console_shows_the_loop_and_sets_an_override_through_its_form(console, redis_client: redis.Redis) -> None:
    page, controller, client = console
    status = client.get("/status").json()
    # every tier's row: the rate in force, the configured caps and the rule that set the rate, as /status says
    for tier, caps in TIERS.items():
        row = page.locator(f'#tiers tr[data-tier="{tier}"]')
        decision = status["tiers"][tier]
        expect(row.locator("td.rule")).to_have_attribute("data-rule", decision["rule"])
        expect(row.locator("td.rule")).to_have_text(rule_label(decision["rule"], "latency_follower"))
        expect(row.locator("td.rate")).to_have_text(f"{decision['rate']:.1f}/s")
        expect(row.locator("td").nth(2)).to_have_text(f"{caps['min_rate']} / {caps['max_rate']}")
        points = row.locator("svg.chart polyline.rate").get_attribute("points") or ""
        assert len(points.split()) == TICKS  # one point per decision of the tier
    expect(page.locator("#role")).to_contain_text("leader")
    expect(page.locator("#mode")).to_have_text("active")
    expect(page.locator("#policy")).to_have_text("latency_follower")
    expect(page.locator("#tick-result")).to_have_text(f"#{TICKS} {status['last_tick']['result']}")

    form = page.locator("#override-form")
    form.locator("select[name=tier]").select_option("free")
    form.locator("input[name=pinned_rate]").fill("55")
    form.locator("input[name=ttl_s]").fill("600")
    form.locator("input[name=who]").fill("alice")
    form.locator("input[name=reason]").fill("launch day")

    # a wrong token: the API's 401 is shown as it is, and nothing is stored
    page.fill("#token", "wrong-token-wrong-token")
    page.click("#token-form button")
    page.click("#ov-set")
    expect(page.locator("#override-result")).to_have_text("HTTP 401: missing or wrong bearer token")
    assert redis_client.hlen(OVERRIDES_KEY) == 0 and redis_client.xlen(AUDIT_KEY) == 0

    # the right token but a bad value: the API's 422 names the field
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    form.locator("input[name=pinned_rate]").fill("-5")
    page.click("#ov-set")
    expect(page.locator("#override-result")).to_contain_text("HTTP 422: pinned_rate: Input should be greater than 0")
    assert redis_client.hlen(OVERRIDES_KEY) == 0

    # a good override: stored in Redis, listed in the audit trail and the row, then applied by the next tick
    form.locator("input[name=pinned_rate]").fill("55")
    page.click("#ov-set")
    expect(page.locator("#override-result")).to_contain_text("override set for free: pinned 55 (alice until")
    stored = json.loads(redis_client.hget(OVERRIDES_KEY, "free"))
    assert stored["pinned_rate"] == 55 and stored["who"] == "alice" and stored["reason"] == "launch day"
    assert stored["expires_at"] == pytest.approx(stored["updated_at"] + 600)
    audit_row = page.locator("#audit tbody tr").first
    expect(audit_row).to_contain_text("alice")
    expect(audit_row).to_contain_text("launch day")
    expect(page.locator("#audit-tier")).to_have_text("free")
    free = page.locator('#tiers tr[data-tier="free"]')
    expect(free.locator("td.override")).to_contain_text("pinned 55 (alice")

    assert controller.loop.tick().result == "written"
    expect(free.locator("td.rule")).to_have_attribute("data-rule", "pinned")
    expect(free.locator("td.rule")).to_have_text("override: pinned")
    expect(free.locator("td.rate")).to_have_text("55.0/s")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)

    # clearing is audited too; switching to shadow is stored for every replica and shown
    page.click("#ov-clear")
    expect(page.locator("#override-result")).to_have_text("override of free cleared")
    assert redis_client.hget(OVERRIDES_KEY, "free") is None
    expect(audit_row).to_contain_text("delete")
    page.locator("#mode-form select[name=mode]").select_option("shadow")
    page.click("#mode-set")
    expect(page.locator("#admin-result")).to_have_text("mode set to shadow from the next tick")
    assert redis_client.get(MODE_KEY) == b"shadow"
    expect(page.locator("#mode")).to_have_text("shadow")
    # reloading loads the configured policy (a baseline here) in place of the one in force
    page.click("#reload")
    expect(page.locator("#admin-result")).to_have_text("policy reloaded: aimd")
    expect(page.locator("#policy")).to_have_text("aimd")
    assert controller.policies.current.name == "aimd"


def test_protected_reads_show_the_401_until_the_token_is_given(
    browser: Browser, redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer
) -> None:
    controller = served_controller(redis_server_session.url, prometheus.url, admin__protect_reads=True)
    controller.loop.tick()
    with ApiServer(controller) as server:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url + "/console")
        expect(page.locator("#read-error")).to_have_text("reading the API failed: HTTP 401: missing or wrong bearer token")
        assert page.locator("#tiers tbody tr").count() == 0
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        expect(page.locator("#tiers tbody tr")).to_have_count(len(TIERS))
        expect(page.locator("#read-error")).to_be_hidden()
        page.close()
    controller.stop()
