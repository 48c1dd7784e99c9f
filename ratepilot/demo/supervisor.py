"""One supervisor for every process the demo starts: start in order, stop all in reverse, always.

If a part fails to start (exits, or does not get ready in time), everything started before it is
stopped and `PartFailed` names the part, the reason and its log file. A part that dies while the
demo runs is reported the same way by `check()`.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from types import TracebackType

from ratepilot.servers import ManagedProcess, ServerError


class PartFailed(RuntimeError):
    """A part of the demo that did not start or died; `part` and `log_path` say which and where to look."""

    def __init__(self, part: str, reason: str, log_path: Path):
        self.part = part
        self.reason = reason
        self.log_path = log_path
        super().__init__(f"{part} failed: {reason} (log: {log_path})")


def log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, or '' when there is none."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class HttpPart(ManagedProcess):
    """A child process that is ready once `GET health_url` answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path, health_path: str = "/health",
                 env: dict[str, str] | None = None):  # fmt: skip
        super().__init__(name, argv, port, workdir, env)
        self.health_url = f"http://127.0.0.1:{port}{health_path}"

    @property
    def url(self) -> str:
        """http:// URL of this part."""
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """The health endpoint answers 200."""
        try:
            with urllib.request.urlopen(self.health_url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False


class Supervisor:
    """Starts parts in order and stops every started part in reverse order (context manager)."""

    def __init__(self, ready_timeout_s: float = 30.0):
        self.ready_timeout_s = ready_timeout_s
        self.parts: list[ManagedProcess] = []

    def start(self, part: ManagedProcess) -> ManagedProcess:
        """Start one part and wait until it is ready; on failure stop everything and raise PartFailed."""
        self.parts.append(part)
        try:
            part.start(ready_timeout_s=self.ready_timeout_s)
        except (ServerError, OSError) as exc:
            self.stop_all()
            reason = str(exc).split("; see ")[0].removeprefix(f"{part.name} ")
            raise PartFailed(part.name, reason, part.log_path) from None
        return part

    def check(self) -> None:
        """Raise PartFailed for the first part that has died since it started."""
        for part in self.parts:
            if part.process is not None and part.process.poll() is not None:
                raise PartFailed(part.name, f"exited with {part.process.returncode} while running", part.log_path)

    def stop_all(self) -> None:
        """Stop every started part, the last started first; idempotent."""
        for part in reversed(self.parts):
            part.stop()

    @property
    def running(self) -> list[str]:
        """Names of the parts whose process is alive."""
        return [part.name for part in self.parts if part.running]

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()
