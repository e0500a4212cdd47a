# Two entry points: `make run` (the main job) and `make test` (lint + whole test suite).
# Both create .venv on first use and re-install only when a requirements file changes.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .  # `import cliquejax` from any directory
	touch $(STAMP)

run: $(STAMP)
	$(PY) launch.py --config=configs/mbclique_digits.py --workdir=runs/mbclique_digits

lint: $(STAMP)
	.venv/bin/ruff check .

# Two workers, a file to each at a time, the longest files first (tests/conftest.py).
test: lint
	$(PY) -m pytest -q -n 2 --dist=loadfile --no-loadscope-reorder --durations=15 tests

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py --repeats 1  # times in benchmarks/README.md

clean:
	rm -rf runs .pytest_cache
