"""`ratepilot SUBCOMMAND ...`: each subcommand lives in the module that owns it, imported lazily.

Every subcommand module exposes `main(argv: list[str]) -> int` with its own argparse parser.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "edge": ("limiter.edge", "run the edge app: limiter middleware in front of a backend"),
    "rls": ("limiter.rls.server", "serve Envoy's global rate-limit service (gRPC) on the same buckets"),
    "controller": ("controller.service", "run the control loop and its admin API"),
    "train": ("training.train", "train the RL policy offline in the simulator"),
    "evaluate": ("training.evaluate", "evaluate policies on scenarios and traces"),
    "calibrate": ("training.calibrate", "fit the simulator's backend model to a history in Prometheus"),
    "promote": ("training.promote", "move the champion alias to the candidate model if it is as good"),
    "demo": ("ratepilot.demo", "the whole closed loop locally on real Redis and Prometheus"),
    "loadtest": ("ratepilot.loadtest.cli", "play a load scenario open-loop against an HTTP endpoint, or export it for k6"),
    "bench": ("benchmarks.cli", "benchmarks: limiter, sim, controller, rls, grpc"),
}


def usage() -> str:
    """The top-level help text."""
    lines = ["usage: ratepilot SUBCOMMAND [options]   (ratepilot SUBCOMMAND --help for its options)", ""]
    lines += [f"  {name:<11} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"ratepilot: unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
