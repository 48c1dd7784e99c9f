"""Start throwaway redis-server and prometheus processes on free local ports (tests and `ratepilot demo`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class ServerError(RuntimeError):
    """A server that could not be found or did not come up; the message names its log file."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def find_binary(name: str) -> str:
    """Absolute path of an executable, or a ServerError telling how to install it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        raise ServerError(f"{name} not found on PATH; `make setup` installs it from Debian packages")
    return path


@dataclass
class ManagedProcess:
    """A child process with a log file; stop() is idempotent, pause()/resume() send SIGSTOP/SIGCONT."""

    name: str
    argv: list[str]
    port: int
    workdir: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        """Where the process writes stdout and stderr."""
        return self.workdir / f"{self.name}.log"

    def start(self, ready_timeout_s: float = 20.0) -> None:
        """Start the process and wait until its port accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            if port_open(self.port) and self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"{self.name} did not listen on port {self.port} within {ready_timeout_s:g} s; see {self.log_path}")

    def ready(self) -> bool:
        """Extra readiness check beyond an open port; subclasses override."""
        return True

    def stop(self) -> None:
        """Terminate (SIGCONT first, in case it is paused) and reap the process."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its sockets open."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None


class RedisServer(ManagedProcess):
    """A redis-server on a free port with no persistence."""

    def __init__(self, workdir: Path | None = None, port: int | None = None, extra_args: list[str] | None = None):
        port = port or free_port()
        workdir = (workdir or Path(tempfile.mkdtemp(prefix="ratepilot-redis-"))).resolve()  # redis runs in it
        argv = [
            find_binary("redis-server"),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            *(extra_args or []),
        ]  # fmt: skip
        super().__init__("redis", argv, port, workdir)

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self) -> None:
        """Stop and start again on the same port (the data is gone: no persistence)."""
        self.stop()
        self.start()


class PrometheusServer(ManagedProcess):
    """A prometheus on a free port scraping the given targets every `scrape_interval_s` seconds."""

    def __init__(
        self,
        targets: list[str],
        workdir: Path | None = None,
        scrape_interval_s: float = 1.0,
        rule_files: list[Path] | None = None,
        port: int | None = None,
    ):
        port = port or free_port()
        workdir = (workdir or Path(tempfile.mkdtemp(prefix="ratepilot-prom-"))).resolve()  # prometheus runs in it
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        rules = "".join(f"  - {p.resolve()}\n" for p in (rule_files or []))
        config.write_text(
            "global:\n"
            f"  scrape_interval: {scrape_interval_s:g}s\n"
            f"  evaluation_interval: {scrape_interval_s:g}s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n"
            "  - job_name: ratepilot\n"
            f"    scrape_interval: {scrape_interval_s:g}s\n"
            "    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n"
        )
        argv = [
            find_binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--web.enable-lifecycle",
        ]
        super().__init__("prometheus", argv, port, workdir)

    @property
    def url(self) -> str:
        """http:// URL of this server."""
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """Prometheus answers /-/ready once its storage is open."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False
