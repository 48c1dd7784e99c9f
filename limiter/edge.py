"""`ratepilot edge`: uvicorn serving the rate-limit middleware in front of a backend.

The backend is, by default, the built-in synthetic one (`limiter.synthetic_backend`: a worker pool
that saturates), or `--backend-url URL` (requests are forwarded with httpx), or `--backend echo`
(answers at once; for benchmarks). Endpoints:

| path                  | limited | what                                                        |
|-----------------------|---------|-------------------------------------------------------------|
| `/v1/...`             | yes     | the backend (e.g. GET /v1/items costs 1, POST /v1/infer 3)  |
| `/rating`             | yes     | the caller's remaining tokens and next refill time          |
| `/health`             | no      | liveness                                                    |
| `/metrics`            | no      | Prometheus metrics                                          |
| `/admin/backend`      | no      | GET / POST `{"capacity_rps": X}`: the synthetic capacity    |

The config file is re-read every second (hot reload); the rate table every `rate_table.poll_s`.

`--processes N` runs N uvicorn worker processes on one port (the kernel spreads connections over
them), each with its own `Edge` built by `worker_app()` from the options the parent validated. They
share the buckets through Redis; each has its own metrics (a scrape of `/metrics` reaches one
process) and, with the synthetic backend, its own worker pool of `capacity_rps`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from limiter.config import ConfigError, LimiterConfig, load_config, resolve_config_path
from limiter.metrics import BackendMetrics
from limiter.middleware import RateLimitMiddleware
from limiter.rate_limiter import RateLimiter
from limiter.rate_reader import RateReader
from limiter.synthetic_backend import SyntheticBackend
from limiter.tracing import configure_from_env
from limiter.verdict import Verdict

log = logging.getLogger("ratepilot.edge")

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
HOP_BY_HOP = frozenset(
    [b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
     b"transfer-encoding", b"upgrade", b"host", b"content-length"]
)  # fmt: skip
MAX_PROCESSES = 64
ENV_WORKER = "RATEPILOT_EDGE_WORKER"  # set by `--processes N` for worker_app(): the options as JSON
ECHO_BODY = b'{"ok":true}'


@dataclass(frozen=True)
class EdgeOptions:
    """How the edge runs: which backend, the synthetic pool's shape, whether to limit at all."""

    backend: str = "synthetic"  # synthetic | echo | an http(s):// URL to forward to
    capacity_rps: float = 200.0
    workers: int = 16
    queue_limit: int = 64
    backend_timeout_s: float = 2.0
    limited: bool = True
    admin: bool = True
    config_path: Path | None = None  # watched for hot reload when set
    reload_s: float = 1.0
    freeze_gc: bool = False
    seed: int | None = None


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line; a record's `fields` dict is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON."""
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, separators=(",", ":"), default=str)


def setup_logging(level: str = "info") -> None:
    """JSON log lines on stderr for every logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _next_whole_token_s(remaining: float, limit: float, rate: float) -> float:
    """Seconds until a bucket holding `remaining` tokens gains its next whole token (0 when full)."""
    if remaining >= limit:
        return 0.0
    target = min(limit, math.floor(remaining) + 1.0)
    return (target - remaining) / rate


class Edge:
    """The edge app and its parts; `edge.app` is the ASGI app to serve."""

    def __init__(self, config: LimiterConfig, options: EdgeOptions | None = None, registry: CollectorRegistry | None = None):
        self.options = options or EdgeOptions()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.limiter = RateLimiter(config, config_path=self.options.config_path, registry=self.registry, reload_s=self.options.reload_s)
        self.metrics = self.limiter.metrics
        self.guard = self.limiter.guard
        self.backend_metrics = BackendMetrics(self.registry)
        self.synthetic: SyntheticBackend | None = None
        if self.options.backend == "synthetic":
            self.synthetic = SyntheticBackend(
                self.backend_metrics,
                capacity_rps=self.options.capacity_rps,
                workers=self.options.workers,
                queue_limit=self.options.queue_limit,
                timeout_s=self.options.backend_timeout_s,
                seed=self.options.seed,
            )
        elif self.options.backend != "echo" and not self.options.backend.startswith(("http://", "https://")):
            raise ValueError(f"backend must be 'synthetic', 'echo' or an http(s):// URL, got {self.options.backend!r}")
        self._http: httpx.AsyncClient | None = None
        self.app = self._build()

    @property
    def reader(self) -> RateReader | None:
        """The limiter's rate-table reader (None until started)."""
        return self.limiter.reader

    # -- app ---------------------------------------------------------------------------------

    def _build(self) -> Any:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/rating", self.rating, methods=["GET"]),
        ]
        if self.options.admin:
            routes.append(Route("/admin/backend", self.admin_backend, methods=["GET", "POST"]))
        if self.options.backend == "echo":
            routes.append(Route("/v1/{rest:path}", self.echo, methods=METHODS))
        elif self.synthetic is not None:
            routes.append(Route("/v1/{rest:path}", self.synthetic_endpoint, methods=METHODS))
        else:
            routes.append(Route("/{rest:path}", self.forward, methods=METHODS))
        app: Any = Starlette(routes=routes, lifespan=self._lifespan)
        if self.options.limited:
            app = RateLimitMiddleware(app, limiter=self.limiter)  # runs the limiter's lifespan around the app's
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Any) -> AsyncIterator[None]:
        await self._start_own()
        try:
            yield
        finally:
            await self._stop_own()

    async def start(self) -> None:
        """Start the limiter (when limiting) and the edge's own parts, as serving the app does."""
        if self.options.limited:
            await self.limiter.start()
        await self._start_own()

    async def stop(self) -> None:
        """Stop the edge's own parts, then the limiter."""
        await self._stop_own()
        await self.limiter.stop()

    async def _start_own(self) -> None:
        """The forwarding client and the GC freeze (the middleware starts the limiter before this)."""
        if self.options.backend.startswith(("http://", "https://")):
            self._http = httpx.AsyncClient(base_url=self.options.backend, timeout=self.options.backend_timeout_s)
        if self.options.freeze_gc:
            gc.collect()
            gc.freeze()  # start-up objects leave the cyclic GC's generations: no long pauses under load

    async def _stop_own(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- endpoints ---------------------------------------------------------------------------

    async def health(self, _request: Request) -> Response:
        """Liveness."""
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def metrics_endpoint(self, _request: Request) -> Response:
        """Prometheus exposition."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def rating(self, request: Request) -> Response:
        """The caller's remaining tokens and when the next one refills (this request paid its cost)."""
        verdict: Verdict | None = request.scope.get("state", {}).get("ratepilot")
        if verdict is None:
            return JSONResponse({"error": "not_limited", "message": "this edge runs without the limiter"}, 404)
        rates = verdict.tier.rates
        client_d, tier_d = verdict.decisions
        buckets = {
            "client": {
                "remaining": client_d.remaining, "limit": client_d.limit, "refill_rate": rates.client_rate,
                "next_refill_s": _next_whole_token_s(client_d.remaining, client_d.limit, rates.client_rate),
                "full_in_s": client_d.reset_after_s,
            },
            "tier": {
                "remaining": tier_d.remaining, "limit": tier_d.limit, "refill_rate": rates.rate,
                "next_refill_s": _next_whole_token_s(tier_d.remaining, tier_d.limit, rates.rate),
                "full_in_s": tier_d.reset_after_s,
            },
        }  # fmt: skip
        binding = "client" if client_d.remaining <= tier_d.remaining else "tier"
        return JSONResponse(
            {
                "tier": verdict.tier.name,
                "remaining": verdict.remaining,
                "next_refill_s": buckets[binding]["next_refill_s"],
                "cost": verdict.cost,
                "source": verdict.source,
                "rate_source": rates.source,
                "buckets": buckets,
            }
        )

    async def admin_backend(self, request: Request) -> Response:
        """GET or POST `{"capacity_rps": X}`: the synthetic backend's capacity (the demo follows a trace)."""
        if self.synthetic is None:
            return JSONResponse({"error": "no_synthetic_backend"}, 404)
        if request.method == "POST":
            try:
                body = json.loads(await request.body())
                if not isinstance(body, dict) or set(body) != {"capacity_rps"}:
                    raise ValueError('the body must be {"capacity_rps": NUMBER}')
                self.synthetic.capacity_rps = body["capacity_rps"]
            except ValueError as exc:
                return JSONResponse({"error": "bad_request", "message": str(exc)}, 400)
        synthetic = self.synthetic
        return JSONResponse(
            {"capacity_rps": synthetic.capacity_rps, "workers": synthetic.workers, "waiting": synthetic.waiting}
        )

    def _tier_label(self, request: Request) -> str:
        verdict: Verdict | None = request.scope.get("state", {}).get("ratepilot")
        return verdict.tier.name if verdict is not None else "none"

    async def echo(self, _request: Request) -> Response:
        """Answer at once (benchmarks measure the edge, not a backend)."""
        return Response(ECHO_BODY, media_type="application/json")

    async def synthetic_endpoint(self, request: Request) -> Response:
        """Serve through the synthetic worker pool; the request's cost scales its service time."""
        assert self.synthetic is not None
        verdict: Verdict | None = request.scope.get("state", {}).get("ratepilot")
        if verdict is not None:
            cost, tier = verdict.cost, verdict.tier.name
        else:
            cost, tier = self.guard.cost(request.method, request.url.path), "none"
        status = await self.synthetic.serve(cost, tier)
        if status == 200:
            return Response(ECHO_BODY, media_type="application/json")
        reason = "backend_overloaded" if status == 503 else "backend_timeout"
        return JSONResponse({"error": reason}, status)

    async def forward(self, request: Request) -> Response:
        """Forward to the backend URL with httpx; 502 when it cannot be reached."""
        assert self._http is not None
        tier = self._tier_label(request)
        headers = [(k, v) for k, v in request.headers.raw if k not in HOP_BY_HOP]
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            upstream = await self._http.request(
                request.method,
                httpx.URL(path=request.url.path, query=request.url.query.encode()),
                headers=headers,
                content=await request.body(),
            )
        except httpx.HTTPError as exc:
            self._record_backend(tier, started, ok=False)
            return JSONResponse({"error": "bad_gateway", "message": type(exc).__name__}, 502)
        self._record_backend(tier, started, ok=upstream.status_code < 500)
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower().encode() not in HOP_BY_HOP}
        return Response(upstream.content, status_code=upstream.status_code, headers=out_headers)

    def _record_backend(self, tier: str, started: float, ok: bool) -> None:
        self.backend_metrics.request_seconds.labels(tier).observe(asyncio.get_running_loop().time() - started)
        self.backend_metrics.requests.labels(tier, "ok" if ok else "error").inc()


# -- command line -----------------------------------------------------------------------------


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The `ratepilot edge` argument parser."""
    parser = argparse.ArgumentParser(prog="ratepilot edge", description="Run the rate-limiting edge in front of a backend.")
    parser.add_argument("--config", help="limiter.yaml (default: $RATEPILOT_CONFIG, else the packaged example)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--backend-url", help="forward limited requests to this http(s):// URL instead of the synthetic backend")
    parser.add_argument("--backend", choices=["synthetic", "echo"], default="synthetic", help="built-in backend")
    parser.add_argument("--capacity-rps", type=_positive(float), default=200.0, help="synthetic backend capacity")
    parser.add_argument("--workers", type=_positive(int), default=16, help="synthetic backend workers")
    parser.add_argument("--queue-limit", type=int, default=64, help="synthetic backend queue bound")
    parser.add_argument("--backend-timeout-s", type=_positive(float), default=2.0, help="queue wait / forward timeout")
    parser.add_argument(
        "--processes", type=int, default=1,
        help=f"uvicorn worker processes on the port, 1..{MAX_PROCESSES} (each its own edge; buckets shared in Redis)",
    )  # fmt: skip
    parser.add_argument("--no-limit", action="store_true", help="serve without the limiter (baseline)")
    parser.add_argument("--no-admin", action="store_true", help="disable POST /admin/backend")
    parser.add_argument("--seed", type=int, help="seed of the synthetic service times")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _server_options() -> dict[str, str]:
    """uvloop and httptools when installed (both much faster than the pure-Python defaults)."""
    options = {"loop": "asyncio", "http": "h11"}
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        options["loop"] = "uvloop"
    with contextlib.suppress(ImportError):
        import httptools  # noqa: F401

        options["http"] = "httptools"
    return options


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot edge`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536 or args.queue_limit < 0:
        print("ratepilot edge: --port must be in 1..65535 and --queue-limit >= 0", file=sys.stderr)
        return 2
    if not 1 <= args.processes <= MAX_PROCESSES:
        print(f"ratepilot edge: --processes must be in 1..{MAX_PROCESSES}, got {args.processes}", file=sys.stderr)
        return 2
    if args.backend_url and not args.backend_url.startswith(("http://", "https://")):
        print(f"ratepilot edge: --backend-url must be an http(s):// URL, got {args.backend_url!r}", file=sys.stderr)
        return 2
    try:
        config_path = resolve_config_path(args.config)
        config = load_config(config_path)
        configure_from_env()  # OTLP span export when the OTEL_* variables ask for it
    except (ConfigError, RuntimeError) as exc:
        print(f"ratepilot edge: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    setup_logging(args.log_level)
    options = EdgeOptions(
        backend=args.backend_url or args.backend,
        capacity_rps=args.capacity_rps,
        workers=args.workers,
        queue_limit=args.queue_limit,
        backend_timeout_s=args.backend_timeout_s,
        limited=not args.no_limit,
        admin=not args.no_admin,
        config_path=config_path,
        freeze_gc=True,
        seed=args.seed,
    )
    fields = {"port": args.port, "backend": options.backend, "limited": options.limited, "processes": args.processes}
    log.info("edge starting", extra={"fields": fields})
    server = {"host": args.host, "port": args.port, "access_log": False, "log_config": None, "lifespan": "on"}
    if args.processes == 1:
        edge = Edge(config, options)
        uvicorn.run(edge.app, log_level=args.log_level, **server, **_server_options())  # type: ignore[arg-type]
        return 0
    os.environ[ENV_WORKER] = json.dumps(
        {"log_level": args.log_level, "options": dataclasses.asdict(options) | {"config_path": str(config_path)}}
    )
    uvicorn.run(
        f"{__name__}:worker_app", factory=True, workers=args.processes, log_level=args.log_level,
        **server, **_server_options(),  # type: ignore[arg-type]
    )  # fmt: skip
    return 0


def worker_app() -> Any:
    """The app of one worker process of `ratepilot edge --processes N` (a uvicorn factory): an Edge built
    from the options in $RATEPILOT_EDGE_WORKER and the config file they name (validated by the parent)."""
    spec = json.loads(os.environ[ENV_WORKER])
    setup_logging(spec["log_level"])
    configure_from_env()  # each worker exports its own spans (the parent checked the OTEL_* variables)
    options = EdgeOptions(**spec["options"] | {"config_path": Path(spec["options"]["config_path"])})
    assert options.config_path is not None
    return Edge(load_config(options.config_path), options).app
