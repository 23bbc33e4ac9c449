# One entry point for set-up, training and tests on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC := torch==2.13.0
TEST_WORKERS ?= 2

.PHONY: setup train test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: setup
	$(BIN)/mettle train $(ARGS)

# pyproject.toml's addopts leave out the slow tests (PYTEST_ARGS="-m slow" runs only those); whole modules go to
# each worker, the longest first (tests/conftest.py's LONGEST_FIRST).
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
