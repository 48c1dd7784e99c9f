"""`ratepilot bench`: usage errors, and a tiny limiter run that writes every promised key (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cli

PROMISED_KEYS = {
    "raw_evalsha_per_s",
    "ours_per_call_per_s",
    "ours_batch_per_s",
    "limits_fixed_window_per_s",
    "limits_moving_window_per_s",
    "limits_sliding_window_per_s",
    "pyrate_token_bucket_per_s",
    "local_bucket_per_s",
}


def test_unknown_benchmark_and_bad_options_exit_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["nonsense"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["limiter", "--rounds", "many"])
    assert exit_info.value.code == 2
    assert cli.main(["limiter", "--seconds", "-1", "--json", "/dev/null"]) == 1


def test_tiny_limiter_run_writes_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "limiter.json"
    assert cli.main(["limiter", "--seconds", "0.03", "--rounds", "1", "--no-http", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result.keys() >= PROMISED_KEYS
    assert all(result[key] > 0 for key in PROMISED_KEYS)
    assert set(result["ratios"]) >= {"ours_over_raw_evalsha", "batch_over_per_call", "ours_over_pyrate_token_bucket"}
    assert out.with_suffix(".png").stat().st_size > 0


def test_cpu_bench_runs_all_three_apps_and_refuses_bad_sizes(tmp_path: Path) -> None:
    """`bench_limiter_cpu` serves every request with 200 through the bare, strict and local-mode apps and
    reports each cost; after its warm-up the local-mode app decides every request from its leases."""
    from benchmarks import bench_limiter_cpu

    out = tmp_path / "cpu.json"
    assert bench_limiter_cpu.main(["--requests", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cpu_us_per_request"]) == {"bare", "limited", "local"}
    assert all(value > 0 for value in result["cpu_us_per_request"].values())
    assert result["local_lease_decision_share"] == 1.0
    with pytest.raises(SystemExit):
        bench_limiter_cpu.main(["--requests", "33"])


def test_tiny_http_run_measures_all_four_edges() -> None:
    """`bench_limiter_http` serves only 200s through bare, chunked, one-batch-per-turn and local-mode edges,
    every strict decision a Redis one, local-mode ones also in process (in one 1-s round most clients are
    still cold: their first requests ask Redis), and reports each promised figure (no timing asserted)."""
    from benchmarks import bench_limiter_http

    result = bench_limiter_http.run_http(1.0, rounds=1)
    for key in ("http_bare_rps", "http_limited_rps", "http_limited_one_batch_per_turn_rps", "http_local_rps"):
        assert result[key] > 0
    assert set(result) >= {"http_limited_over_bare", "http_chunked_over_one_batch_per_turn", "http_added_p99_ms",
                           "http_local_over_bare", "http_local_over_bare_median_of_rounds"}  # fmt: skip
    assert result["http_non_200"] == {"bare": 0, "limited": 0, "one_batch": 0, "local": 0}
    assert set(result["http_limited_redis_decision_share"].values()) == {1.0}  # strict edges: Redis decides every one
    assert result["http_local_lease_decision_share"] > 0
