# `make run` serves the demo; `make test` checks and tests everything. Both build .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
APT_PACKAGES := redis-server mosquitto curl nginx caddy chromium socat

.PHONY: run test check pytest bench bench-deps system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The tests start their own redis-server, mosquitto, nginx, caddy and Chromium on free loopback ports, and socat for a
# pseudo-terminal pair (the Modbus RTU serial tests); they need the binaries.
system-deps:
	@missing=""; for cmd in redis-server mosquitto curl nginx caddy chromium socat; do command -v $$cmd >/dev/null || missing="$$missing $$cmd"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

run: $(STAMP)
	$(BIN)/wellstream demo

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy app tests bench

pytest: $(STAMP) system-deps
	$(BIN)/pytest

test: check pytest

# nchan, the benchmark's peer system (bench/nchan.py), is nginx's module from Debian; nothing else needs it.
NCHAN_MODULE := /usr/lib/nginx/modules/ngx_nchan_module.so
bench-deps: system-deps
	@if [ ! -f $(NCHAN_MODULE) ]; then \
		echo "installing libnginx-mod-nchan"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libnginx-mod-nchan; \
	fi

# The fan-out benchmark (about 30 minutes, estimated from its rows; BENCH_ARGS=--quick for a few). Pins to cores 0 and 1.
bench: $(STAMP) bench-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
