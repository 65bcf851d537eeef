# The two commands: `make run` and `make test`. Both build .venv from pyproject.toml when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= runs/mnist_cnn
PYTEST_ARGS ?=
# Test processes (pytest-xdist): `auto` is one per core; `make test PYTEST_WORKERS=0` runs in this process.
PYTEST_WORKERS ?= auto

.PHONY: run test lint format bench notebook doctor wheel accel-check clean venv

venv: $(STAMP)

# Rebuilt only when pyproject.toml changes: a fast no-op otherwise.
$(STAMP): pyproject.toml
	@echo "setting up $(VENV) from pyproject.toml (first time: a minute or two)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.mnist_cnn --workdir $(WORKDIR)

# pytest exits 5 when it collected no test: that is a broken setup, not a pass.
test: $(STAMP)
	@$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing (setup problem)"; exit 1; fi; \
	exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxnets experiments tests bench scripts notebooks
	$(VENV)/bin/ruff format --check jaxnets experiments tests bench scripts notebooks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix jaxnets experiments tests bench scripts notebooks
	$(VENV)/bin/ruff format jaxnets experiments tests bench scripts notebooks

# Benchmarks against Keras 3 (JAX backend), PyTorch and numpy, in their own environment.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS  ?=

$(BENCH_STAMP): pyproject.toml bench/requirements.txt
	@echo "setting up $(BENCH_VENV) from bench/requirements.txt"
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -qq --disable-pip-version-check -r bench/requirements.txt
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	KERAS_BACKEND=jax $(BENCH_VENV)/bin/python bench/run.py $(BENCH_ARGS)

notebook: $(STAMP)
	$(PY) scripts/run_notebook.py

doctor: $(STAMP)
	$(PY) -m jaxnets doctor

# dist/jaxnets-<version>-py3-none-any.whl (jaxnets + experiments) and a zip of the source
# tree: either one, uploaded to a Colab runtime or Drive, is the notebook's JAXNETS_SOURCE.
wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps -w dist .
	git archive --format=zip -o dist/jaxnets-$$($(PY) -c 'import importlib.metadata as m; print(m.version("jaxnets"))')-src.zip HEAD
	@ls -l dist

# The prepared accelerator check (GPU/TPU, under 8 minutes): ACCEL_ARGS=--quick runs it on CPU.
ACCEL_ARGS ?=
accel-check: $(STAMP)
	$(PY) scripts/accelerator_check.py $(ACCEL_ARGS)

clean:
	rm -rf $(VENV) runs dist .pytest_cache
