# ortserve: developer tasks. `make install` once, then any of the others.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install test lint format serve demo bench clean

install: $(VENV)/.installed

# Each step says what it does, and pip shows what it collects and downloads (a bar on a
# terminal), so the ~100 s of a first install are not silent. PIP_FLAGS=--quiet: as before.
PIP_FLAGS ?= --progress-bar on

$(VENV)/.installed: setup.cfg pyproject.toml
	@echo "==> [1/4] virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] pip, setuptools, wheel"
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@echo "==> [3/4] torch 2.13.0: the CPU wheel, pinned first (not GBs of CUDA packages)"
	$(PY) -m pip install $(PIP_FLAGS) torch==2.13.0
	@echo "==> [4/4] ortserve with its convert, ray and dev extras"
	$(PY) -m pip install $(PIP_FLAGS) -e '.[convert,ray,dev]'
	touch $@
	@echo "==> $(VENV) is ready"

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
