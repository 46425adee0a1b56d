# Two entry points (see README): `make demo` and `make test`. Both create and reuse .venv.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench format clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/distill demo prostate --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_prostate_models.py

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
