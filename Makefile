# ortserve: developer tasks. `make install` once, then any of the others.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install test lint format serve demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# torch first and pinned: the local CPU wheel, not GBs of CUDA packages
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[convert,dev]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check ortserve converters tests benchmarks
	$(VENV)/bin/ruff format --check ortserve converters tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix ortserve converters tests benchmarks
	$(VENV)/bin/ruff format ortserve converters tests benchmarks

# The main job: build the demo models offline if the library lacks them, then serve them
# (ORTSERVE_HOST, default 127.0.0.1:11434; Ctrl-C stops).
demo: install
	$(PY) -m converters.demo
	$(VENV)/bin/ortserve list
	$(VENV)/bin/ortserve serve

serve: install
	$(VENV)/bin/ortserve serve

# The speed goals as ratios measured side by side in one run (docs/performance.md); the table
# also goes to benchmarks/out/bench.json. BENCH_ARGS: --quick (a smoke run), --only SECTIONS,
# --with convert,adapter (the slower Qwen2-0.5B benchmarks), --update-docs (record the table).
bench: install
	$(PY) benchmarks/bench.py --json benchmarks/out/bench.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache build *.egg-info
