"""The `ratepilot` command: every subcommand has --help, an unknown one is a one-line error."""

from __future__ import annotations

import pytest

from ratepilot.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:  # argparse exits; a dispatcher such as `bench` prints its own usage and returns
        code = main([name, "--help"])
    except SystemExit as exited:
        code = exited.code
    assert code == 0
    assert "usage: ratepilot" in capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_no_subcommand_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: ratepilot SUBCOMMAND" in capsys.readouterr().out


def test_unknown_subcommand_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown subcommand 'frobnicate'" in err
