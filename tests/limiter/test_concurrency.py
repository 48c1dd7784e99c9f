"""Several client processes on one bucket never get more than burst + rate × elapsed (tolerance zero)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from limiter.bucket import MICRO, BucketSpec

from .conftest import Backend

REPO = Path(__file__).resolve().parents[2]
HAMMER_S = 3.0  # "a few seconds" of four processes on one key


def hammer_argv(backend: Backend, key: str, spec: BucketSpec, cost: float, mode: str, **extra: object) -> list[str]:
    """argv of one hammer client process."""
    argv = [sys.executable, "-m", "tests.limiter.hammer", "--url", backend.url, "--key", key]
    argv += ["--rate", repr(spec.rate), "--capacity", repr(spec.capacity), "--cost", repr(cost), "--mode", mode]
    argv += [f"--{name}={value}" for name, value in extra.items()]
    return argv + (["--cluster"] if backend.cluster else [])


def test_processes_hammering_one_key_never_over_admit(backend: Backend) -> None:
    """4 processes (per call, batched, coalescing asyncio) for ~3 s: admitted tokens <= capacity + rate × elapsed.

    Elapsed is measured on the server clock before the first and after the last check, so the
    bound is exact: the tolerance is zero micro-tokens.
    """
    key = f"rp:{{{backend.tag()}}}:c:shared"
    spec, cost = BucketSpec(150.0, 40.0), 1.5
    start_us = backend.server_time_us(key)
    workers = [
        subprocess.Popen(
            hammer_argv(backend, key, spec, cost, mode, seconds=HAMMER_S), cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for mode in ("call", "call", "batch", "async")
    ]
    outputs = [json.loads(worker.communicate(timeout=60)[0]) for worker in workers]
    end_us = backend.server_time_us(key)
    assert all(worker.returncode == 0 for worker in workers)
    admitted = sum(out["admitted"] for out in outputs)
    denied = sum(out["denied"] for out in outputs)
    admitted_ut = admitted * math.floor(cost * MICRO)
    bound_ut = spec.capacity_ut + math.floor((end_us - start_us) * spec.rate)
    assert admitted_ut <= bound_ut
    assert admitted >= spec.capacity // cost  # the burst itself always passes
    assert denied > admitted  # the bucket really was under pressure
    assert sum(out["errors"] for out in outputs) == 0
