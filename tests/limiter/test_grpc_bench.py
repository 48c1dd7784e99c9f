"""`ratepilot bench grpc` run tiny: every promised key written, every limited call decided on Redis (no timing asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import cli


def test_tiny_grpc_bench_writes_the_promised_keys(tmp_path: Path) -> None:
    out = tmp_path / "grpc.json"
    assert cli.main(["grpc", "--duration", "0.2", "--rounds", "1", "--rate", "100", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["grpc_limited_calls_per_s"] > 0 and result["grpc_bare_calls_per_s"] > 0
    assert result["grpc_limited_over_bare"] == result["grpc_limited_calls_per_s"] / result["grpc_bare_calls_per_s"]
    assert math.isfinite(result["grpc_added_p99_ms"])
    assert result["redis_decision_share"] >= 0.99


def test_bad_options_exit_non_zero(tmp_path: Path) -> None:
    assert cli.main(["grpc", "--concurrency", "0", "--json", str(tmp_path / "g.json")]) == 1
