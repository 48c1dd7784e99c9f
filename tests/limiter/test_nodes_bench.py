"""`ratepilot bench nodes`: bad options are refused before any edge starts; a tiny run with one and two real
edges writes every promised figure, and local mode's admissions meet both targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cli


def test_bad_options_are_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nodes", "--sizes", "0,3", "--json", str(tmp_path / "n.json")]) == 1
    assert cli.main(["nodes", "--sizes", "three", "--json", str(tmp_path / "n.json")]) == 1
    assert cli.main(["nodes", "--seconds", "-1", "--json", str(tmp_path / "n.json")]) == 1
    assert cli.main(["nodes", "--json", str(tmp_path)]) == 2  # a folder, not a file: refused by the CLI first
    assert "--json" in capsys.readouterr().err
    assert not (tmp_path / "n.json").exists()


def test_tiny_run_reports_admitted_bound_and_strict_per_size(tmp_path: Path) -> None:
    out = tmp_path / "nodes.json"
    assert cli.main(["nodes", "--sizes", "1,2", "--seconds", "2", "--connections", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["nodes"]) == {"1", "2"}
    for figures in result["nodes"].values():
        assert figures.keys() >= {"admitted", "bound", "strict_admitted"}
        assert 0 < figures["admitted"] <= figures["bound"] + 1
        assert figures["admitted"] >= 0.95 * figures["strict_admitted"]
        assert figures["target_within_bound"] and figures["target_at_least_095_strict"]
    assert out.with_suffix(".png").stat().st_size > 0
