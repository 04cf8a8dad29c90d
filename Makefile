# fraudscore: `make run` serves the bundled data on :9999; `make test` runs every check.
# Both install what they need into .venv first.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
INDEX  ?= data/references.fsidx
PORT   ?= 9999

.PHONY: install index run test lint typecheck unit bench clean

$(BIN)/.installed: pyproject.toml setup.py src/fraudscore/index/_knn.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

$(INDEX): data/references.json.gz $(BIN)/.installed
	$(BIN)/fraudscore index build --references data/references.json.gz --out $(INDEX)

index: $(INDEX)

run: install index
	$(BIN)/fraudscore serve --index $(INDEX) --port $(PORT)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

unit: install index
	$(BIN)/python -m pytest

test: lint typecheck unit

bench: install index
	$(BIN)/python bench/search.py
	$(BIN)/python bench/http_single.py

clean:
	rm -rf build src/*.egg-info src/fraudscore/index/*.so $(INDEX)
