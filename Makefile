# Two commands do all set-up: `make quickstart` and `make test` (see README).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA_DIR ?= datasets
WORKDIR  ?= workdirs/quickstart
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup quickstart test test-all lint bench clean

# The virtual environment is rebuilt whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(PY) -m navit_seq.quickstart --data-dir $(DATA_DIR) --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest -q -n 2

# Includes tests marked slow.
test-all: setup
	$(PY) -m pytest -q -n 2 -m ''

lint: setup
	$(VENV)/bin/ruff check navit_seq tests experiments configs
	$(VENV)/bin/ruff format --check navit_seq tests experiments configs

# Benchmark extra: CPU torch + vit-pytorch (the peer NaViT).
bench-setup: setup
	$(PY) -m pip install --quiet -e '.[test,bench]'

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
