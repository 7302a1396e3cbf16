# nanokimi: `make help` lists the targets.
#
# Two interpreters are supported:
#   * a CPU machine (development, CI): a project virtual environment in .venv with the CPU torch build and
#     triton 3.8 (whose interpreter runs the kernels on NumPy);
#   * the GPU machine: its own python3 already imports torch with CUDA and has no registry access, so the
#     project is installed into it with --no-deps and nothing is downloaded.
SHELL := /bin/bash
.DEFAULT_GOAL := help

SYS_PYTHON ?= python3
HAVE_CUDA := $(shell $(SYS_PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo 1)

ifeq ($(HAVE_CUDA),1)
PY := $(SYS_PYTHON)
STAMP := build/.installed-system
else
PY := .venv/bin/python
STAMP := .venv/.installed
endif

CHAPTERS := muon moba kda attnres moe rl serving uncertainty
NOTEBOOKS := $(wildcard 0*/*.ipynb shared/*.ipynb)
TESTS ?= tests
PYTEST_ARGS ?=
XDIST ?= -n auto

.PHONY: help install test test-gpu bench notebooks demo lint format env-check grade exercises-copy clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-15s %s\n", $$1, $$2}'

install: $(STAMP) ## set up: .venv with CPU torch (or the GPU machine's own python), nanokimi -e .[dev]

.venv/.installed: pyproject.toml
	test -x .venv/bin/python || $(SYS_PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	# The CPU build of torch first (a local wheel on the project's machines); otherwise any torch >= 2.11.
	.venv/bin/python -m pip install -q torch==2.13.0 || .venv/bin/python -m pip install -q "torch>=2.11"
	# CPU torch does not pull triton; the interpreter needs 3.7/3.8 with numpy 2.4 (see pyproject.toml).
	.venv/bin/python -m pip install -q triton==3.8.0
	.venv/bin/python -m pip install -q -e ".[dev]"
	touch $@

build/.installed-system: pyproject.toml
	mkdir -p build
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: $(STAMP) ## CPU suite (what CI runs): tests, Triton kernels interpreted, notebooks executed
	$(PY) -m pytest $(XDIST) $(TESTS) --nbmake $(NOTEBOOKS) $(PYTEST_ARGS)

test-gpu: $(STAMP) ## the suite plus @pytest.mark.gpu tests (compiled kernels, bf16, large shapes); needs CUDA
	@if [ "$(HAVE_CUDA)" != "1" ]; then echo "make test-gpu: no CUDA device visible to $(SYS_PYTHON) (torch.cuda.is_available() is False); run it on the GPU machine" >&2; exit 2; fi
	NANOKIMI_REQUIRE_GPU=1 $(PY) -m pytest -n 8 $(TESTS) $(PYTEST_ARGS)

bench: $(STAMP) ## every chapter's bench.py (GPU only): results/<gpu>.json, PNG, README table
	@if [ "$(HAVE_CUDA)" != "1" ]; then echo "make bench: no CUDA device; benchmarks time compiled kernels on a GPU" >&2; exit 2; fi
	@set -e; for ch in $(or $(CHAPTER),$(CHAPTERS)); do \
	  if $(PY) -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('nanokimi.$$ch.bench') else 1)"; then \
	    echo "== nanokimi.$$ch.bench"; $(PY) -m nanokimi.$$ch.bench; \
	  else echo "== nanokimi.$$ch.bench: not written yet, skipped"; fi; \
	done
	$(PY) -m nanokimi.readme_results

notebooks: $(STAMP) ## execute every notebook in place (fresh, top to bottom)
	$(PY) -m jupyter nbconvert --to notebook --execute --inplace $(NOTEBOOKS)

demo: $(STAMP) ## the end-to-end story (GPU=1 for the Triton backends on a CUDA machine)
	$(PY) -m nanokimi.demo $(if $(GPU),--gpu,)

lint: $(STAMP) ## ruff check + ruff format --check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## ruff format + ruff check --fix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

env-check: $(STAMP) ## [OK]/[FAIL] for Python, torch, triton, numpy, CUDA, and how kernels will run
	$(PY) -m nanokimi.env_check

grade: $(STAMP) ## grade exercises: make grade CHAPTER=03_kda_linear [ATTEMPT=my_copy/] (all chapters without CHAPTER)
	$(PY) -m nanokimi.grade $(CHAPTER) $(if $(ATTEMPT),--path $(ATTEMPT),)

exercises-copy: $(STAMP) ## a student copy of the repo without solutions/: make exercises-copy DEST=dir
	@if [ -z "$(DEST)" ]; then echo "make exercises-copy: set DEST=folder" >&2; exit 2; fi
	$(PY) -m nanokimi.grade --student-copy $(DEST)

clean: ## remove caches and build output (keeps .venv)
	rm -rf build .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
