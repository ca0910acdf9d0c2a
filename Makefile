# Two commands on a fresh machine: `make run` (generate with the built-in model) and `make test`.
PY ?= $(shell PYENV_VERSION=3.12.1 command -v python3.12 2>/dev/null || command -v python3.12 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
# The install peaks near 8 GB (5.6 GB stay): torch from PyPI is a CUDA build.
MIN_FREE_GB ?= 8
# Greedy, the model at its best: a class's first method opens the rest of the class.
ARGS ?= --prompt "$$(printf 'class Stack:\n    def __init__(self):')" --max-new-tokens 50

.PHONY: run test venv clean

$(BIN)/.installed: pyproject.toml constraints.txt
	@PYENV_VERSION=3.12.1 $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || \
	  { echo "jaxfire needs Python >= 3.12 (jax >= 0.11); set PY=/path/to/python3.12" >&2; exit 1; }
	@[ -d $(VENV) ] || PYENV_VERSION=3.12.1 $(PY) -c 'import shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
	  sys.exit(0 if free >= $(MIN_FREE_GB) else f"installing needs about $(MIN_FREE_GB) GB free on this disk, " \
	  f"{free:.1f} GB are free (torch from PyPI is a CUDA build); free some space, or set MIN_FREE_GB=0 to try anyway")'
	PYENV_VERSION=3.12.1 $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PIP_CONSTRAINT= $(BIN)/python -m pip install -q --no-cache-dir -c constraints.txt -e '.[test,bench]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/python -m jaxfire.generate $(ARGS)

test: venv
	$(BIN)/python -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV)
