"""Output paths checked before a command does any work: a file it will write, or a folder it will fill.

Every subcommand that writes results (`--json`, `--plots`, `--out`, `--run-dir`) calls these first,
so a path that cannot be written fails in a second with one line, not after the whole run. Nothing
is created here; the writer makes missing folders later. It lives in the lowest package so every
command (controller, training, demo, benchmarks) can import it.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the option, the path and why."""


def _existing_ancestor(path: Path, option: str) -> Path:
    """The nearest part of `path` that exists; it must be a writable folder (the rest gets created)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"{option} {path}: no permission to write in {parent}")
            return parent
    raise OutputPathError(f"{option} {path}: no existing folder above it")  # pragma: no cover - / always exists


def check_output_file(path: str | Path, option: str = "--json") -> Path:
    """`path` as an absolute Path if a file can be written there (replacing one that exists); else OutputPathError."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder, not a file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{option} {path}: the file exists and is not writable")
        return path
    if path.name in ("", ".", ".."):
        raise OutputPathError(f"{option} {path}: not a file name")
    _existing_ancestor(path, option)
    return path


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """`path` as an absolute Path if it is (or can be made) a writable folder; else OutputPathError."""
    path = Path(path).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"{option} {path}: is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {path}: no permission to write in it")
        return path
    _existing_ancestor(path, option)
    return path


def check_outputs(
    files: dict[str, str | Path | None] | None = None, dirs: dict[str, str | Path | None] | None = None
) -> None:
    """Check every output a command was given (option -> path; None: not given); OutputPathError on the first bad one."""
    for option, path in (files or {}).items():
        if path is not None:
            check_output_file(path, option)
    for option, path in (dirs or {}).items():
        if path is not None:
            check_output_dir(path, option)


def output_problem(
    files: dict[str, str | Path | None] | None = None, dirs: dict[str, str | Path | None] | None = None
) -> str | None:
    """`check_outputs` for commands without a try block: the one-line reason, or None when all can be written."""
    try:
        check_outputs(files, dirs)
    except OutputPathError as exc:
        return str(exc)
    return None
