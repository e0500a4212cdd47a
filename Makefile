# `make run` (the main job), `make test` (lint + the suite but the `fork` test; CI), `make
# test-fast` (the edit loop: no test that starts a process), `make test-oldest` (the fast
# tests on the oldest supported stack) and `make test-without-cpu` (the fast tests in a copy
# without cliquejax/cpu/). Each creates its virtualenv on first use and
# re-installs only when a requirements file changes.
PY := .venv/bin/python
STAMP := .venv/.installed

# Python 3.12 (jax >= 0.11 needs it) with requirements.txt, the tested lock of the newest
# releases; without a Python 3.12, the oldest supported stack on Python 3.11 (its lock's
# Python), or on python3 where no 3.11 is found either.
PYTHON311 := $(firstword $(foreach p,python3.11 $(wildcard $(HOME)/.pyenv/versions/3.11*/bin/python3.11),$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
PYTHON312 := $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
ifeq ($(PYTHON312),)
BASE_PYTHON := $(or $(PYTHON311),python3)
LOCK := requirements-oldest.txt
$(info no Python 3.12 found: .venv uses $(BASE_PYTHON) with the oldest supported stack (requirements-oldest.txt))
else
BASE_PYTHON := $(PYTHON312)
LOCK := requirements.txt
endif
OLD_PY := .venv-oldest/bin/python
OLD_STAMP := .venv-oldest/.installed
SAME_PYTHON := import sys; print(sys.version_info[:2])

.PHONY: run test test-fast test-oldest test-without-cpu lint bench clean venv-gpu

$(STAMP): $(LOCK) requirements-dev.txt pyproject.toml
	@if [ -x $(PY) ] && [ "$$($(PY) -c '$(SAME_PYTHON)')" != "$$($(BASE_PYTHON) -c '$(SAME_PYTHON)')" ]; \
	then echo "rebuilding .venv on $(BASE_PYTHON)"; rm -rf .venv; fi
	test -x $(PY) || $(BASE_PYTHON) -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK) -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .  # `import cliquejax` from any directory
	touch $(STAMP)

run: $(STAMP)
	$(PY) launch.py --config=configs/mbclique_digits.py --workdir=runs/mbclique_digits

lint: $(STAMP)
	.venv/bin/ruff check .

# Two workers, a file to each at a time, the longest files first (tests/conftest.py).
test: lint
	$(PY) -m pytest -q -n 2 --dist=loadfile --no-loadscope-reorder --durations=15 -m "not fork" tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

$(OLD_STAMP): requirements-oldest.txt requirements-dev.txt
	test -n "$(PYTHON311)" || { echo "make test-oldest needs Python 3.11"; exit 1; }
	test -x $(OLD_PY) || $(PYTHON311) -m venv .venv-oldest
	$(OLD_PY) -m pip install --quiet --upgrade pip
	$(OLD_PY) -m pip install --quiet -r requirements-oldest.txt -r requirements-dev.txt
	touch $(OLD_STAMP)

# Not installed into the environment: the tests import cliquejax from this checkout.
test-oldest: $(OLD_STAMP)
	$(OLD_PY) -m pytest -q -n 2 -m "not slow" tests

# A fork for accelerators deletes cliquejax/cpu/: its fast tests must still pass.
test-without-cpu: $(STAMP)
	$(PY) -m pytest -q -m fork tests

# `python -m cliquejax.lower --compile --gpu=h100`'s environment (about 2.5 GB): the lock
# plus jax's CUDA plugin at the lock's jax version, whose XLA:GPU compiles for a simulated
# GPU on this CPU. No test needs it (those that use it skip without it).
GPU_PY := .venv-gpu/bin/python
GPU_STAMP := .venv-gpu/.installed
JAX_VERSION = $(shell sed -n 's/^jax==//p' requirements.txt)

venv-gpu: $(GPU_STAMP)

$(GPU_STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -n "$(PYTHON312)" || { echo "make venv-gpu needs Python 3.12 (jax $(JAX_VERSION))"; exit 1; }
	test -x $(GPU_PY) || $(PYTHON312) -m venv .venv-gpu
	$(GPU_PY) -m pip install --quiet --upgrade pip
	$(GPU_PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt \
		"jax[cuda13]==$(JAX_VERSION)"
	$(GPU_PY) -m pip install --quiet --no-deps -e .
	touch $(GPU_STAMP)

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py --repeats 1  # times in benchmarks/README.md

clean:
	rm -rf runs .pytest_cache
