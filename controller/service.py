"""`ratepilot controller`: run the control loop and its admin API in one process.

    ratepilot controller [--config FILE] [--redis-url URL] [--prometheus-url URL] [--mode active|shadow]
                         [--policy NAME] [--model PATH_OR_URI] [--replica-id ID] [--host H] [--port P]
                         [--tick-interval S] [--once [--json FILE]] [--log-level LEVEL]

`--once` runs a single tick (after trying the lease) and exits: 0 when rates were written (or
logged, in shadow mode) from Redis and Prometheus answers, 1 otherwise (also when not one Prometheus
query was answered); `--json FILE` then holds the tick report. Bad settings or a
policy that does not load exit 2 with a one-line error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from controller.policies import LoadedPolicy, PolicyLoadError, load_policy
from controller.settings import (
    ENV_CONFIG,
    ENV_OVERRIDES,
    ControllerSettings,
    SettingsError,
    read_config_mapping,
    settings_from_mapping,
)
from limiter.config_file import apply_env, set_path
from limiter.paths import output_problem
from limiter.tracing import configure_from_env

log = logging.getLogger("ratepilot.controller")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `ratepilot controller`."""
    parser = argparse.ArgumentParser(prog="ratepilot controller", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help=f"controller YAML (default: ${ENV_CONFIG} or the packaged controller.yaml)")
    parser.add_argument("--redis-url", help="overrides redis.url")
    parser.add_argument("--prometheus-url", help="overrides prometheus.url")
    parser.add_argument("--mode", choices=("active", "shadow"), help="overrides loop.mode")
    parser.add_argument("--policy", help="overrides policy.name (rl or a baseline name)")
    parser.add_argument("--model", help="overrides policy.model (a .npz path or models:/ratepilot-policy@champion)")
    parser.add_argument("--replica-id", help="overrides replica_id (default: hostname-pid)")
    parser.add_argument("--host", help="overrides admin.host")
    parser.add_argument("--port", type=int, help="overrides admin.port")
    parser.add_argument("--tick-interval", type=float, help="overrides loop.tick_interval_s")
    parser.add_argument("--once", action="store_true", help="run one tick and exit")
    parser.add_argument("--json", type=Path, metavar="FILE", help="with --once: write the tick report here")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _with_cli(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        ("redis", "url"): args.redis_url,
        ("prometheus", "url"): args.prometheus_url,
        ("loop", "mode"): args.mode,
        ("loop", "tick_interval_s"): args.tick_interval,
        ("policy", "name"): args.policy,
        ("policy", "model"): args.model,
        ("admin", "host"): args.host,
        ("admin", "port"): args.port,
        ("replica_id",): args.replica_id,
    }
    for path, value in overrides.items():
        if value is None:
            continue
        set_path(data, path, value)
    return data


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> ControllerSettings:
    """Settings from the file, the environment and then the command line; SettingsError if invalid."""
    env = dict(os.environ) if env is None else env
    path = args.config or env.get(ENV_CONFIG)
    where = str(path or "controller.yaml")
    data = read_config_mapping(path)
    try:  # file, then environment, then command line
        return settings_from_mapping(_with_cli(apply_env(data, ENV_OVERRIDES, env), args), env={})
    except SettingsError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s", stream=sys.stderr
    )


def _run_once(settings: ControllerSettings, policy: LoadedPolicy, args: argparse.Namespace) -> int:
    from controller.runtime import Controller

    controller = Controller(settings, policy)
    try:
        controller.lease.try_acquire_or_renew()
        controller.shadow.refresh()  # the candidate in shadow, when enabled (a failed load is logged, never fatal)
        report = controller.loop.tick()
    finally:
        controller.stop()
    payload = {**report.summary(), "tiers": report.tiers}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    print(json.dumps({k: payload[k] for k in ("result", "mode", "version", "errors")}))
    if controller.loop.failing_ticks:  # no Redis, or not one Prometheus query answered: not a good tick
        print("ratepilot controller: the tick could not read its inputs (see errors)", file=sys.stderr)
        return 1
    return 0 if report.result in ("written", "shadow") else 1


def _serve(settings: ControllerSettings, policy: LoadedPolicy) -> int:
    from controller.runtime import Controller

    controller = Controller(settings, policy)
    if not settings.admin.enabled:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        controller.start()
        stop.wait()
        controller.stop()
        return 0
    import uvicorn

    from controller.api.app import create_app

    app = create_app(controller)
    config = uvicorn.Config(app, host=settings.admin.host, port=settings.admin.port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot controller`."""
    args = build_parser().parse_args(argv)
    if args.json and not args.once:
        print("ratepilot controller: --json needs --once", file=sys.stderr)
        return 2
    if problem := output_problem({"--json": args.json}):
        print(f"ratepilot controller: {problem}", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"ratepilot controller: {exc}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)
    try:
        policy = load_policy(settings.policy)  # refuse to start on a policy that does not load
    except PolicyLoadError as exc:
        print(f"ratepilot controller: {exc}", file=sys.stderr)
        return 2
    try:
        configure_from_env()  # OTLP export of the tick spans when the OTEL_* variables ask for it
    except RuntimeError as exc:
        print(f"ratepilot controller: {exc}", file=sys.stderr)
        return 2
    if args.once:
        return _run_once(settings, policy, args)
    return _serve(settings, policy)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
