"""`ratepilot promote --min-shadow-ticks/--min-shadow-s`: read from a real controller's decision stream.

A real controller (real redis-server; its Prometheus is a closed port, so every tier is held stale,
which changes nothing here) runs the registry's `candidate` (of a fresh store, so no champion yet) in shadow, pinned to its version; promote
refuses until the stream holds that version's ticks, then accepts; `--force` overrides and is recorded.
The review notebook's shadow section reads the same stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nbformat
import pytest
import redis
from nbclient import NotebookClient

from controller.policies import LoadedPolicy
from controller.runtime import Controller
from policy.registry import make_policy
from policy.rl import DEFAULT_MODEL_PATH
from ratepilot.servers import RedisServer, free_port
from tests.controller.support import make_settings
from training import registry
from training.promote import ShadowPeriod, candidate_model, main, shadow_period, shadow_shortfall

FAST = ["--seeds", "1", "--suite", "default"]
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "review.ipynb"
TICKS = 3


def register(path: Path, name: str) -> str:
    """Register a policy file as a new version with the `candidate` alias."""
    with mlflow.start_run(run_name=name):
        return registry.register_candidate(registry.log_policy(path)).version


def shadow_controller(redis_url: str) -> Controller:
    """A controller running aimd as champion and the registry's candidate in shadow (Prometheus unreachable)."""
    settings = make_settings(redis_url, f"http://127.0.0.1:{free_port()}", candidate__enabled=True)
    controller = Controller(settings, LoadedPolicy(make_policy("aimd"), "aimd"))
    assert controller.lease.try_acquire_or_renew()
    assert controller.shadow.refresh() is not None, controller.shadow.last_error
    return controller


@pytest.fixture
def fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty MLflow store of this test's own (no champion), for the controller and promote alike."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return registry.configure(uri)


def tags(version: str) -> dict[str, str]:
    return dict(registry.client().get_model_version(registry.REGISTERED_MODEL, version).tags)


def test_promote_refuses_until_the_shadow_period_then_accepts(
    fresh_store: str, redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = register(DEFAULT_MODEL_PATH, "shadowed")
    capsys.readouterr()  # MLflow's registration messages
    shadow = ["--min-shadow-ticks", str(TICKS), "--redis-url", redis_server.url]
    assert main([*FAST, *shadow]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"ratepilot promote: refused: {candidate_model(version)} decided in shadow for only 0 of --min-shadow-ticks {TICKS} ticks"
    assert tags(version)["promotion.decision"] == "refused"
    assert registry.version_by_alias(registry.CHAMPION) is None

    controller = shadow_controller(redis_server.url)
    try:
        assert controller.shadow.current is not None and controller.shadow.current.model == candidate_model(version)
        for _ in range(TICKS - 1):
            assert controller.loop.tick().result == "written"
        assert main([*FAST, *shadow]) == 1 and f"only {TICKS - 1} of" in capsys.readouterr().err
        assert controller.loop.tick().result == "written"
    finally:
        controller.stop()
    period = shadow_period(redis.Redis.from_url(redis_server.url), candidate_model(version))
    assert period.ticks == TICKS and period.span_s > 0

    assert main([*FAST, *shadow, "--min-shadow-s", "0.001", "--json", str(tmp_path / "ok.json")]) == 0
    record = json.loads((tmp_path / "ok.json").read_text())
    assert record["promote"] is True and record["forced"] is False and record["reason"] == "no champion yet"
    assert record["shadow"]["ticks"] == TICKS
    assert record["shadow"]["shortfall"] is None
    assert registry.version_by_alias(registry.CHAMPION).version == version
    assert json.loads(tags(version)["promotion.shadow"])["ticks"] == TICKS


def test_force_overrides_the_shadow_period_and_is_recorded(fresh_store: str, redis_server: RedisServer, tmp_path: Path) -> None:
    version = register(DEFAULT_MODEL_PATH, "unshadowed")
    code = main([*FAST, "--min-shadow-s", "60", "--redis-url", redis_server.url, "--force", "--json", str(tmp_path / "f.json")])
    assert code == 0
    record = json.loads((tmp_path / "f.json").read_text())
    assert record["promote"] is True and record["forced"] is True
    assert record["reason"] == f"no champion yet; forced although {candidate_model(version)} decided in shadow for only 0.0 of --min-shadow-s 60 s"
    assert registry.version_by_alias(registry.CHAMPION).version == version
    assert tags(version)["promotion.forced"] == "True" and "min-shadow-s 60" in tags(version)["promotion.reason"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-shadow-ticks", "3"], "need --redis-url"),
        (["--min-shadow-s", "nan", "--redis-url", "redis://127.0.0.1:1/0"], "must be >= 0"),
        (["--min-shadow-s", "inf", "--redis-url", "redis://127.0.0.1:1/0"], "must be >= 0"),
        (["--min-shadow-ticks", "-1", "--redis-url", "redis://127.0.0.1:1/0"], "must be >= 0"),
        (["--min-shadow-ticks", "3", "--redis-url", "http://x"], "--redis-url: not a Redis URL"),
    ],
)
def test_bad_shadow_options_are_refused_before_any_work(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratepilot promote: ") and message in err and err.count("\n") == 1


def test_shadow_shortfall_names_what_is_missing() -> None:
    period = ShadowPeriod("models:/ratepilot-policy/7", 4, 12.5)
    assert shadow_shortfall(period, 4, 12.5) is None
    assert shadow_shortfall(period, 5, 0) == "models:/ratepilot-policy/7 decided in shadow for only 4 of --min-shadow-ticks 5 ticks"
    both = shadow_shortfall(period, 5, 30)
    assert both is not None and both.endswith("4 of --min-shadow-ticks 5 ticks and 12.5 of --min-shadow-s 30 s")


def test_review_notebook_compares_the_candidate_in_shadow(
    tracked_store: tuple[str, Path], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, root = tracked_store
    registry.configure(uri)
    register(root / "policy.npz", "notebook")
    controller = shadow_controller(redis_server.url)
    try:
        for _ in range(TICKS):
            assert controller.loop.tick().result == "written"
    finally:
        controller.stop()
    monkeypatch.setenv("RATEPILOT_REDIS_URL", redis_server.url)  # the kernel inherits it
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs) + "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    n_tiers = len(controller.settings.tiers)
    # Prometheus is unreachable: every tier is held stale, an incident, and both hold the same rate
    assert f"shadow: {TICKS * n_tiers} decisions over {TICKS} ticks" in text
    assert f"incidents: {TICKS * n_tiers} (stale {TICKS * n_tiers})" in text
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 3  # the curves, the episodes, the shadow
