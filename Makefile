# Each target creates .venv and installs the project on first use: on a fresh machine
# `make demo` and `make test` are the whole set-up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BENCH_MODE ?= quick

.PHONY: demo test test-fast bench lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch is pinned in the same call so that no dependency pulls a CUDA build.
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.pipeline --preset demo --run runs/demo

test: $(STAMP)
	scripts/ensure-chromium
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run --mode $(BENCH_MODE)

lint: $(STAMP)
	$(VENV)/bin/ruff check acol_core flows tune tests benchmarks scripts
	$(VENV)/bin/ruff format --check acol_core flows tune tests benchmarks scripts

format: $(STAMP)
	$(VENV)/bin/ruff format acol_core flows tune tests benchmarks scripts
	$(VENV)/bin/ruff check --fix acol_core flows tune tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache
