# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build by default. On a GPU machine: make TORCH_SPEC="torch==2.13.0" \
#   TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128" test
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEEPSPEED_SPEC ?= deepspeed==0.19.8
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit lint format bench gpu-wheels clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so nothing later pulls a different build.
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	# deepspeed builds against the installed torch, without ops compiled ahead.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install -q -e ".[dev,distributed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m carpool.orchestrator.demo

# Two pytest-xdist workers: the tests on Ray in one lane, the rest beside them
# (tests/helpers/xdist_lanes.py). TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	# A crash at exit (after the summary) prints every thread's stack.
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests

test-unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not integration" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check carpool orchestrator workers tests benchmarks
	$(VENV)/bin/ruff format --check carpool orchestrator workers tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format carpool orchestrator workers tests benchmarks
	$(VENV)/bin/ruff check --fix carpool orchestrator workers tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/engine.py

# Wheels benchmarks/gpu.sh installs on the GPU machine, which has no registry and no pydantic.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
		typing-inspection==0.4.5 typing_extensions==4.16.0

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
