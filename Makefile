# The README's two commands are `make demo` and `make check` (what CI runs).
SHELL := /bin/bash
# uv on PATH, else the one bootstrap installed with pip (python3 -m uv).
UV ?= $(shell command -v uv >/dev/null 2>&1 && echo uv || echo python3 -m uv)
ENV ?= debian:12

.PHONY: bootstrap demo test check lint typecheck dist-check bench clean

bootstrap:
	@./scripts/bootstrap.sh

demo: bootstrap
	$(UV) run pyro run $(ENV) -- cat /etc/os-release

# bootstrap installed QEMU, runsc and bubblewrap, so here a VM test skipped for a
# missing backend is a failure (tests/conftest.py; PYRO_REQUIRE_VMS=0 relaxes it).
# The suite's wall time is printed last (docs/benchmarks.md records it).
PYRO_REQUIRE_VMS ?= 1
test: bootstrap
	@start=$$(date +%s); \
	PYRO_REQUIRE_VMS=$(PYRO_REQUIRE_VMS) $(UV) run pytest; rc=$$?; \
	echo "test suite wall time: $$(( $$(date +%s) - start )) s (pytest exit $$rc)"; \
	exit $$rc

lint: bootstrap
	$(UV) run ruff check src tests bench
	$(UV) run ruff format --check src tests bench

typecheck: bootstrap
	$(UV) run mypy

check: lint typecheck test

dist-check: bootstrap
	rm -rf dist && $(UV) build -q
	rm -rf .dist-venv && $(UV) venv -q .dist-venv
	VIRTUAL_ENV=.dist-venv $(UV) pip install -q dist/*.whl
	.dist-venv/bin/pyro --version
	.dist-venv/bin/pyro doctor --json > /dev/null
	rm -rf .dist-venv

bench: bootstrap
	$(UV) run python bench/bench.py
	$(UV) run python bench/bench_tasks.py
	$(UV) run python bench/bench_files.py
	$(UV) run python bench/bench_memory.py
	$(UV) run python bench/bench_mcp.py
	$(UV) run python bench/bench_realwork.py

clean:
	rm -rf dist .dist-venv .pytest_cache .mypy_cache .ruff_cache
