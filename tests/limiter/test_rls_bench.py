"""`ratepilot bench rls` run tiny: every promised key written, every call decided on Redis (no timing asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import cli


def test_tiny_rls_bench_writes_the_promised_keys(tmp_path: Path) -> None:
    out = tmp_path / "rls.json"
    assert cli.main(["rls", "--duration", "0.2", "--rounds", "1", "--rate", "100", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rls_calls_per_s"] > 0 and result["noop_calls_per_s"] > 0
    assert math.isfinite(result["rls_added_p99_ms"])
    assert result["rls_over_noop"] == result["rls_calls_per_s"] / result["noop_calls_per_s"]
    assert result["redis_decision_share"] >= 0.99  # the bench refuses to report fallback decisions


def test_bad_options_exit_non_zero_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "rls.json"
    assert cli.main(["rls", "--duration", "0", "--json", str(out)]) == 1
    assert cli.main(["rls", "--rate", "nan", "--json", str(out)]) == 1
    assert not out.exists()
