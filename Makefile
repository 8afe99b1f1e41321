# Two-command quickstart: `make demo` (install + distil on the micro-world) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WORKDIR ?= runs/quickstart

.PHONY: install demo test lint

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m hybrid_jax.distill --config=configs/quickstart.py --workdir=$(WORKDIR)

test: install
	$(BIN)/python -m pytest -n 2 -q tests

lint: install
	$(BIN)/ruff check .
