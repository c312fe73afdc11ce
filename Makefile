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
	$(PY) -m pip install -q -e ".[test]"
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

bench: install  ## benchmarks -> bench/data/*.jsonl and plots; figures go into bench/RESULTS.md
	mkdir -p bench/data
	$(PY) -m bench.ddp_overhead | tee bench/data/ddp_overhead_mms.jsonl
	$(PY) -m bench.ddp_overhead --dask-malloc-trim dask-default | tee bench/data/ddp_overhead_dask_default.jsonl
	$(PY) -m bench.pipeline_walltime | tee bench/data/pipeline_walltime.jsonl
	$(PY) -m bench.batch_predict | tee bench/data/batch_predict.jsonl
	$(PY) -m bench.fedavg_table | tee bench/data/fedavg_table.jsonl
	$(PY) -m bench.strategies  # writes bench/data/strategies.jsonl and bench/strategies.png
	$(PY) -m bench.comm_bytes  # appends to bench/data/comm_bytes.jsonl
	$(PY) -m bench.serving | tee bench/data/serving.jsonl  # also draws bench/serving.png
	$(PY) -m bench.plot

clean:
	rm -rf .mms mlruns .pytest_cache .ruff_cache
