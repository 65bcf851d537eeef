# The two commands: `make run` and `make test`. Both build .venv when needed: jaxnets with
# the exact tested versions of everything (jaxnets/constraints/pinned.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PINS   := jaxnets/constraints/pinned.txt
PIP    := -m pip install -qq --disable-pip-version-check
WORKDIR ?= runs/mnist_cnn
PYTEST_ARGS ?=
# Test processes (pytest-xdist): `auto` is one per core; `make test PYTEST_WORKERS=0` runs in this process.
PYTEST_WORKERS ?= auto

.PHONY: run test test-slow test-all test-compat lint format types docs docs-serve bench notebook \
	doctor wheel pins accel-check clean venv

venv: $(STAMP)

# Rebuilt only when pyproject.toml or the pins change: a fast no-op otherwise.
$(STAMP): pyproject.toml $(PINS)
	@echo "setting up $(VENV) from pyproject.toml and $(PINS) (first time: a minute or two)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP) -c $(PINS) -e '.[dev,docs]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.mnist_cnn --workdir $(WORKDIR)

# pytest exits 5 when it collected no test: that is a broken setup, not a pass.
define pytest
@$(1) -m pytest -n $(PYTEST_WORKERS) $(2) $(PYTEST_ARGS); rc=$$?; \
if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing (setup problem)"; exit 1; fi; \
exit $$rc
endef

# Everything but the tests marked `slow` (those run in `make test-slow`; `make test-all` runs both).
test: $(STAMP)
	$(call pytest,$(PY),-m "not slow")

test-slow: $(STAMP)
	$(call pytest,$(PY),-m slow)

test-all: $(STAMP)
	$(call pytest,$(PY),)

LINTED := jaxnets experiments tests bench scripts notebooks

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

# The type checker on the library (settings in pyproject.toml, [tool.mypy]).
types: $(STAMP)
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/): broken links and references fail the build.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve

# Today's Colab stack (Python 3.13, jax 0.7.2, flax 0.11.2, ...: jaxnets/constraints/colab.txt)
# in .venv-compat; the built wheel is installed on top and must replace none of it
# (scripts/check_install.py), then the tests marked `compat` run against the installed wheel
# (`python -P`: the source tree's jaxnets is not on the path; experiments/ is, alone).
# Python 3.13: pyenv's (as on these machines) or python3.13 on the PATH.
COMPAT_PYTHON ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.13*/bin/python3.13) python3.13)
COMPAT_VENV   := .venv-compat
COMPAT_STAMP  := $(COMPAT_VENV)/.installed
COLAB_PINS    := jaxnets/constraints/colab.txt

$(COMPAT_STAMP): $(COLAB_PINS)
	@echo "setting up $(COMPAT_VENV) from $(COLAB_PINS)"
	@test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python $(PIP) -r $(COLAB_PINS)
	@touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	rm -rf build/compat && mkdir -p build/compat/path
	$(COMPAT_VENV)/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w build/compat .
	$(COMPAT_VENV)/bin/python scripts/check_install.py --constraints $(COLAB_PINS) build/compat/jaxnets-*.whl
	ln -s $(CURDIR)/experiments build/compat/path/experiments
	PYTHONPATH=$(CURDIR)/build/compat/path $(COMPAT_VENV)/bin/python -P -c \
	  "import jaxnets; assert 'site-packages' in jaxnets.__file__, jaxnets.__file__; print('testing', jaxnets.__file__)"
	$(call pytest,PYTHONPATH=$(CURDIR)/build/compat/path $(COMPAT_VENV)/bin/python -P,-m compat -p no:cacheprovider)

# Benchmarks against Keras 3 (JAX backend), PyTorch and numpy, in their own environment.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS  ?=

$(BENCH_STAMP): pyproject.toml $(PINS) bench/requirements.txt
	@echo "setting up $(BENCH_VENV) from bench/requirements.txt"
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python $(PIP) -c $(PINS) -r bench/requirements.txt
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	KERAS_BACKEND=jax $(BENCH_VENV)/bin/python bench/run.py $(BENCH_ARGS)

notebook: $(STAMP)
	$(PY) scripts/run_notebook.py

doctor: $(STAMP)
	$(VENV)/bin/jaxnets doctor

# dist/jaxnets-<version>-py3-none-any.whl (the library) and a zip of the source tree (the
# library, experiments/, notebooks/): the zip, uploaded to a Colab runtime or Drive, is the
# notebook's JAXNETS_SOURCE when the experiments should run there.
wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps -w dist .
	git archive --format=zip -o dist/jaxnets-$$($(PY) -c 'import jaxnets; print(jaxnets.__version__)')-src.zip HEAD
	@ls -l dist

# After changing a version in .venv on purpose: write the pins anew from it.
pins: $(STAMP)
	{ sed -n '/^#/p' $(PINS); $(PY) -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^jaxnets=='; } > $(PINS).new
	mv $(PINS).new $(PINS)

# The prepared accelerator check (GPU/TPU, under 8 minutes): ACCEL_ARGS=--quick runs it on CPU.
ACCEL_ARGS ?=
accel-check: $(STAMP)
	$(PY) scripts/accelerator_check.py $(ACCEL_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs dist build .pytest_cache
