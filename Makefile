# One command to set up and run the node, one to set up and run the tests.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
CONFIG ?= config/ainode.example.yaml

.PHONY: setup serve test check lint typecheck bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml algorithms/pyproject.toml algorithms/lung-ct-density/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e './algorithms[models,test]' -e ./algorithms/lung-ct-density -e '.[dev]'
	touch $@

var/ainode.key: | $(VENV)/.installed
	$(BIN)/ainode keys generate --out $@

serve: setup var/ainode.key
	$(BIN)/ainode config check $(CONFIG)
	$(BIN)/ainode db upgrade --config $(CONFIG)
	$(BIN)/ainode serve --config $(CONFIG)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

check: lint typecheck

# two workers, each file's tests on one of them (module fixtures start their peers once)
test: check
	$(BIN)/pytest -n 2 --dist loadfile

bench: setup
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/e2e.py --slices 500 --runs 2
	$(BIN)/python bench/algorithm.py
	$(BIN)/python bench/deid.py
	$(BIN)/python bench/rules.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/associations.py
	$(BIN)/python bench/resources.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/first_touch.py
	$(BIN)/python bench/network_bound.py
	$(BIN)/python bench/objects.py
	$(BIN)/python bench/critical_path.py
	$(BIN)/python bench/scaleout.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
