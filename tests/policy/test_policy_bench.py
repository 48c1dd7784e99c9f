"""`ratepilot bench policy` run tiny: every promised figure written for every tier count, bad sizes refused
before any work (no timing asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import cli


def test_tiny_policy_bench_reports_each_tier_count(tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    assert cli.main(["policy", "--tiers", "1,7", "--ticks", "4", "--rounds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for tiers in (1, 7):
        row = result[f"tiers_{tiers}"]
        for key in ("rl_act_us_per_tier", "aimd_act_us_per_tier", "build_us_per_tier"):
            assert math.isfinite(row[key]) and row[key] >= 0, (tiers, key)
        assert isinstance(row["rl_meets_50us"], bool)
    assert result["model"]["path"] == "default_policy.npz" and result["model"]["bytes"] > 0
    assert result["model"]["features"] > 0


def test_bad_sizes_exit_non_zero_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    for argv in (["--tiers", "0"], ["--ticks", "0"], ["--rounds", "0"], ["--tiers", ""]):
        assert cli.main(["policy", *argv, "--json", str(out)]) != 0, argv
    assert not out.exists()
