# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3

.PHONY: setup demo test
setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m ray_scout.cli run experiments/demo.yaml --out results/demo

test: setup
	$(PYTHON) -m pytest -q -rs
