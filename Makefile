# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines: this exact pin takes the CPU wheel on disk; any other spec pulls GBs of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	# PYTHONWARNINGS: setuptools' editable-install warning (a folder named like a package may shadow
	# it: our mlflow/ holds no Python, see the design brief) is the only warning on a first screen.
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install  ## train, evaluate, compress and register the digits model on embedded defaults
	$(VENV)/bin/mms run examples/digits.yaml

test: install lint  ## the whole suite (what CI runs)
	$(PY) -m pytest -q --durations=15

test-fast: install  ## everything but the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install  ## every benchmark at a size for 2 cores (~20 min) -> bench/data/*.jsonl, bench/*.png, bench/RESULTS.md; BENCH_SIZE=full: each at its own defaults (~55 min)
	$(PY) -m bench.run_all --size $(or $(BENCH_SIZE),quick)  # runs bench.plot and bench.report at the end, prints each time and the total

clean:
	rm -rf .mms mlruns .pytest_cache .ruff_cache
