"""Controller test fixtures: one real Prometheus scraping a synthetic exporter every second."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.synthetic_exporter import SyntheticExporter
from ratepilot.servers import PrometheusServer
from tests.controller.support import EXPORTED_TIERS, RECORDING_RULES, query, wait_for


@pytest.fixture(scope="package")
def exporter() -> Iterator[SyntheticExporter]:
    """The synthetic edge/limiter metrics: healthy traffic on every tier but `idle`."""
    exp = SyntheticExporter(EXPORTED_TIERS)
    exp.set("idle", request_rps=0.0, admitted_tps=0.0)
    exp.start()
    yield exp
    exp.stop()


@pytest.fixture(scope="package")
def prometheus(exporter: SyntheticExporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping the exporter every second with the deploy's recording rules, once it has data for a rate window."""
    server = PrometheusServer([exporter.target], workdir=tmp_path_factory.mktemp("prom-controller"), scrape_interval_s=1.0,
                              rule_files=[RECORDING_RULES])  # fmt: skip
    server.start()
    expr = 'sum by (tier) (rate(ratepilot_decision_tokens_total{outcome="allowed"}[3s]))'

    def steady() -> bool:
        result = query(server.url, expr)
        return len(result) >= 4 and all(abs(float(s["value"][1]) - 50.0) < 2.5 for s in result if s["metric"]["tier"] != "idle")

    wait_for(steady, timeout_s=40)
    yield server
    server.stop()
