"""`ratepilot bench BENCHMARK [options] --json FILE`: run one benchmark, write its JSON, print a table.

Each benchmark module exposes `add_arguments(parser)` and `run(args) -> dict`; it is imported
only when chosen, so one benchmark's dependencies never slow down or break another.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from limiter.paths import output_problem

BENCHMARKS: dict[str, tuple[str, str]] = {
    "limiter": ("benchmarks.bench_limiter", "limiter checks/s against raw EVALSHA, `limits` and pyrate-limiter"),
    "sim": ("benchmarks.bench_sim", "simulator steps/s"),
    "policy": ("benchmarks.bench_policy", "learned policy inference per tier against AIMD and the observation builder"),
    "controller": ("benchmarks.bench_controller", "controller tick latency"),
    "grpc": ("benchmarks.bench_grpc", "gRPC calls/s and added p99: an echo server with the rate-limit interceptor vs without"),
    "rls": ("benchmarks.bench_rls", "Envoy ShouldRateLimit calls/s and added p99: ratepilot rls vs a no-op servicer"),
    "nodes": ("benchmarks.bench_nodes", "1, 3 and 6 real edges: local mode's admissions against its bound and strict mode"),
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def print_and_save(result: dict[str, Any], path: str | None) -> None:
    """Print a standalone benchmark's result as JSON, and write it to `path` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def usage() -> str:
    """The help text listing the benchmarks."""
    lines = ["usage: ratepilot bench BENCHMARK [options] [--json FILE]   (ratepilot bench BENCHMARK --help)", ""]
    lines += [f"  {name:<11} {help_text}" for name, (_, help_text) in BENCHMARKS.items()]
    return "\n".join(lines)


def flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, for the table."""
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def render(name: str, result: dict[str, Any]) -> Table:
    """A rich table of the result's scalar values (lists, e.g. per-round samples, stay in the JSON)."""
    table = Table(title=f"ratepilot bench {name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in flatten(result).items():
        if isinstance(value, list | tuple):
            continue
        if isinstance(value, float):
            text = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        else:
            text = str(value)
        table.add_row(key, text)
    return table


def main(argv: list[str]) -> int:
    """Run the chosen benchmark; 0 on success, 2 on bad usage, 1 when the benchmark failed."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"ratepilot bench: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module_name, help_text = BENCHMARKS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        print(f"ratepilot bench {name}: cannot load {module_name}: {error}", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog=f"ratepilot bench {name}", description=help_text)
    parser.add_argument(
        "--json", type=Path, default=RESULTS_DIR / f"{name}.json", metavar="FILE", help="where to write the results"
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    if problem := output_problem({"--json": args.json}):
        print(f"ratepilot bench {name}: {problem}", file=sys.stderr)
        return 2
    try:
        result: dict[str, Any] = module.run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"ratepilot bench {name}: {error}", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    console = Console()
    console.print(render(name, result))
    console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
