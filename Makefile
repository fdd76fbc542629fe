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

bench: install
	$(PY) benchmarks/convert_bench.py
	$(PY) benchmarks/serve_bench.py
	$(PY) benchmarks/adapter_bench.py

clean:
	rm -rf $(VENV) .cache .pytest_cache build *.egg-info
