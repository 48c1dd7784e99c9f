"""`ratepilot demo`: the closed loop on real Redis, Prometheus, edge and controller, adaptive vs static."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot demo` (imports the demo's parts only when it runs)."""
    from ratepilot.demo.cli import main as demo_main

    return demo_main(argv)
