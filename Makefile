# Two entry points (see README): `make demo` and `make test`. Both create and reuse .venv.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench format lock clean-venv

# The exact versions CI tested (requirements.lock, hashed), then the package itself.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve requirements.lock from pyproject.toml's ranges (needs the index; several minutes).
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --extra dev --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-find-links --no-emit-index-url --output-file requirements.lock pyproject.toml

demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/distill demo prostate --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_prostate_models.py

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
