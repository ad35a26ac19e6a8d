# One task runner for humans and CI. `make demo` and `make test` are the README's quick start.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-reliability test-all test-ray lint typecheck bench clean

$(BIN)/piaa: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(BIN)/piaa

install: $(BIN)/piaa

demo: install          ## the main job, offline: generate, index, fit, tag, search, ablation
	$(BIN)/piaa demo

test: install          ## the fast suite (Postgres tests run when PIAA_TEST_PG is set)
	$(BIN)/python -m pytest -m "not slow" -q

test-reliability: install  ## hostile files (Pillow's test images, fetched once from PyPI) and kill -9 runs
	$(BIN)/python -m pytest -m reliability -q

test-all: install      ## everything, slow tests included
	$(BIN)/python -m pytest -q

test-ray: install      ## the Ray engine on a two-node local cluster (started by the tests; slow)
	$(BIN)/python -m pytest -m ray -q tests/test_ray.py

lint: install
	$(BIN)/ruff check piaa_index plugins migrations tests benchmarks docs tools
	$(BIN)/ruff format --check piaa_index plugins migrations tests benchmarks docs tools
	$(BIN)/lint-imports  # the layer contracts in pyproject.toml ([tool.importlinter])

typecheck: install
	$(BIN)/mypy piaa_index

bench: install
	$(BIN)/python benchmarks/bench_pvcl_synthetic.py
	$(BIN)/python benchmarks/bench_index_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
