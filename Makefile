# Two commands do everything: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 3030
DATA_DIR ?= .agor
TEST_WORKERS ?= 2

.PHONY: serve test lint typecheck unit sim-sweep bench clean dist

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dist]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/agor-actors serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

lint: $(STAMP)
	$(BIN)/ruff check agor_actors supervisors protocols sim tests bench release
	$(BIN)/ruff format --check agor_actors supervisors protocols sim tests bench release

typecheck: $(STAMP)
	$(BIN)/mypy agor_actors supervisors protocols sim release

unit: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS)

test: lint typecheck unit

# One executable: dist/agor-actors (PyInstaller one-file; see release/build_dist.py).
dist: $(STAMP)
	$(BIN)/python release/build_dist.py --dist-dir dist --work-dir build/pyinstaller

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist
