"""Every subcommand that writes files checks its output paths before any work: one line, exit 2, nothing done."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from limiter.paths import OutputPathError, check_output_dir, check_output_file
from ratepilot.cli import main

FAST_EVALUATE = ["--policies", "static", "--seeds", "1", "--steps", "5"]
FAST_TRAIN = ["--no-mlflow", "--iterations", "1", "--time-budget-s", "1", "--dagger-rounds", "1", "--dagger-episodes", "2",
              "--episodes-per-iteration", "2", "--validation-episodes", "2", "--eval-seeds", "1", "--no-eval-plots"]  # fmt: skip
FAST_DEMO = ["--duration", "4", "--no-compare"]
NO_PROMETHEUS = ["--prometheus-url", "http://127.0.0.1:9", "--start", "now-1m", "--end", "now"]
NO_SERVERS = ["--redis-url", "redis://127.0.0.1:1/0", "--prometheus-url", "http://127.0.0.1:9"]


def cases(tmp: Path) -> list[tuple[list[str], str, Path]]:
    """(argv, the option named in the error, a path that must not exist afterwards: proof no work was done)."""
    blocker = tmp / "blocker"  # a file where a folder is needed
    runs, model, demo = tmp / "runs", tmp / "policy.npz", tmp / "demo"
    train = [*FAST_TRAIN, "--run-dir", str(runs), "--out", str(model)]
    return [
        (["evaluate", *FAST_EVALUATE, "--json", str(blocker / "out.json")], "--json", tmp / "blocker_plots"),
        (["evaluate", *FAST_EVALUATE, "--json", str(tmp)], "--json", tmp / "never"),  # a folder, not a file
        (["evaluate", *FAST_EVALUATE, "--json", str(tmp / "r.json"), "--plots", str(blocker / "p")], "--plots", tmp / "r.json"),
        (["train", *train, "--json", str(blocker / "t.json")], "--json", runs),
        (["train", *FAST_TRAIN, "--run-dir", str(runs), "--out", str(blocker / "p.npz")], "--out", runs),
        (["train", *FAST_TRAIN, "--run-dir", str(blocker / "runs"), "--out", str(model)], "--run-dir", model),
        (["promote", "--tracking-uri", f"sqlite:///{tmp / 'm.db'}", "--json", str(blocker / "p.json")], "--json", tmp / "m.db"),
        (["controller", *NO_SERVERS, "--once", "--json", str(blocker / "tick.json")], "--json", tmp / "never"),
        (["demo", *FAST_DEMO, "--out", str(demo), "--json", str(blocker / "d.json")], "--json", demo),
        (["demo", *FAST_DEMO, "--out", str(blocker / "demo")], "--out", tmp / "never"),
        (["bench", "sim", "--envs", "2", "--steps", "10", "--rounds", "1", "--json", str(blocker / "b.json")], "--json", tmp / "never"),
        (["calibrate", *NO_PROMETHEUS, "--out", str(blocker / "c.json")], "--out", tmp / "never"),
        (["calibrate", *NO_PROMETHEUS, "--out", str(tmp / "c.json"), "--plot", str(blocker / "c.png")], "--plot", tmp / "c.json"),
    ]


@pytest.mark.parametrize("index", range(13), ids=lambda i: f"case{i}")
def test_an_unwritable_output_path_fails_before_any_work(index: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the demo's default folder and any stray output land here
    (tmp_path / "blocker").write_text("a file, not a folder\n")
    argv, option, untouched = cases(tmp_path)[index]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and ("is a file, not a folder" in err[0] or "is a folder" in err[0]), err
    assert not untouched.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_check_output_file_and_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert check_output_file(tmp_path / "new" / "deeper" / "x.json") == tmp_path / "new" / "deeper" / "x.json"
    assert check_output_file(tmp_path / "f") == tmp_path / "f"  # replacing a file is fine
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    with pytest.raises(OutputPathError, match=r"--json .*/f/x/y.json: .*/f is a file, not a folder"):
        check_output_file(tmp_path / "f" / "x" / "y.json")
    with pytest.raises(OutputPathError, match="is a folder, not a file"):
        check_output_file(tmp_path)
    with pytest.raises(OutputPathError, match="--plots .*/f: is a file, not a folder"):
        check_output_dir(tmp_path / "f", "--plots")
    assert not (tmp_path / "new").exists() and not (tmp_path / "a").exists()  # checking creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputPathError, match="no permission"):
        check_output_file(locked / "x.json")
