# The two commands for a fresh machine: `make run` and `make test`.
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif

.PHONY: run test lint bench-quick bench-full uv

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q "uv==$(UV_VERSION)"

run: uv
	$(UV) sync --frozen --no-dev
	$(UV) run --frozen --no-dev tether serve

test: uv
	$(UV) sync --frozen
	$(UV) run --frozen pytest -q

lint: uv
	$(UV) sync --frozen
	$(UV) run --frozen ruff check server tests bench
	$(UV) run --frozen mypy --strict server

bench-quick: uv
	$(UV) sync --frozen
	$(UV) run --frozen python -m bench --quick

bench-full: uv
	$(UV) sync --frozen
	$(UV) run --frozen python -m bench --full
