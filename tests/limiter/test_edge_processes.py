"""`ratepilot edge --processes 4`: four uvicorn worker processes on one port, 200 concurrent HTTP clients
(aiohttp, in a process of their own) on one API key for several seconds, never more admitted than
burst + rate × elapsed on the Redis server clock (tolerance zero)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from limiter.bucket import MICRO
from limiter.edge import main
from ratepilot.servers import RedisServer, free_port, port_open
from tests.limiter.support import CONFIG_HEAD, write_config

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 4
CLIENTS = 200
HAMMER_S = 4.0
RATE, BURST = 20.0, 10.0
# fail_closed: a check Redis could not decide (a loaded machine) is refused, never admitted by a local
# guard, so every 200 was granted by the one Redis bucket and the bound holds exactly
SHARED_CONFIG = CONFIG_HEAD + f"""default_tier: shared
tiers:
  shared:
    client:    {{rate: {RATE}, burst: {BURST}}}
    aggregate: {{rate: 1000000, burst: 1000000}}
    failure_policy: fail_closed
"""


def worker_pids(parent: int) -> list[int]:
    """Processes started by `parent` with multiprocessing's spawn (uvicorn's workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def bucket_connections(client: redis.Redis) -> int:
    """Redis connections whose last command was the bucket script or its load: one per edge process."""
    return sum(1 for info in client.client_list() if info["cmd"] in ("evalsha", "script|load"))


@pytest.fixture
def edge_processes(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`ratepilot edge --processes 4` on SHARED_CONFIG; yields its URL and process once all four workers are up."""
    config = write_config(tmp_path / "limiter.yaml", redis_server.url, SHARED_CONFIG)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATEPILOT_")}
    argv = [sys.executable, "-m", "ratepilot.cli", "edge", "--config", str(config), "--processes", str(PROCESSES)]
    log = (tmp_path / "edge.log").open("wb")
    process = subprocess.Popen(
        [*argv, "--backend", "echo", "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
    )
    try:
        with redis.Redis.from_url(redis_server.url) as admin:
            deadline = time.monotonic() + 60
            while not (port_open(port) and bucket_connections(admin) == PROCESSES):
                assert process.poll() is None, (tmp_path / "edge.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the edge processes did not all connect to Redis within 60 s"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def test_four_processes_200_clients_one_key_never_over_admit(
    edge_processes: tuple[str, subprocess.Popen[bytes]], redis_server: RedisServer
) -> None:
    url, process = edge_processes
    assert len(worker_pids(process.pid)) == PROCESSES
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_resetstat()
    load = subprocess.run(
        [sys.executable, "-m", "tests.limiter.http_hammer", "--url", url, "--key", "one-key",
         "--clients", str(CLIENTS), "--seconds", str(HAMMER_S), "--redis-url", redis_server.url],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert load.returncode == 0, load.stderr[-2000:]
    summary = json.loads(load.stdout)
    # the load process read the server clock just before its first request and just after its last answer
    start_us, end_us = summary["server_start_us"], summary["server_end_us"]
    admitted = summary["statuses"].get("200", 0)
    refused = summary["statuses"].get("429", 0)

    assert summary["errors"] == 0, summary["first_errors"]
    assert set(summary["statuses"]) <= {"200", "429"}
    # exact: every admitted request took one token from the one Redis bucket, which holds BURST and gains
    # RATE per second of server time between the two TIME readings that enclose every request
    admitted_ut = admitted * MICRO
    bound_ut = int(BURST * MICRO) + math.floor((end_us - start_us) * RATE)
    assert admitted_ut <= bound_ut, (admitted, bound_ut / MICRO)
    # and the bucket was really under pressure and really used: most refusals name the client bucket,
    # and the tokens that came in while the clients hammered were handed out
    assert refused >= 10 * admitted and summary["refused_by"].get("client", 0) >= 0.9 * refused, summary
    assert admitted >= BURST + RATE * summary["seconds"] * 0.7, (admitted, summary)
    # all four processes decided requests through Redis (each one's bucket connection last ran the script)
    assert bucket_connections(admin) == PROCESSES
    assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] >= PROCESSES
    assert len(worker_pids(process.pid)) == PROCESSES  # none died under the load
    with httpx.Client(base_url=url, timeout=5) as client:
        assert client.get("/health").status_code == 200
    admin.close()


@pytest.mark.parametrize("value", ["0", "-1", "65"])
def test_processes_out_of_range_is_one_line_and_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--processes", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ratepilot edge: --processes must be in 1..64, got {value}"


def test_processes_not_a_number_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--processes", "two"])
    assert exit_info.value.code == 2
    assert "--processes" in capsys.readouterr().err
