# Two commands on a fresh machine: `make run` (generate with the built-in model) and `make test`.
PY ?= $(shell PYENV_VERSION=3.12.1 command -v python3.12 2>/dev/null || command -v python3.12 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
ARGS ?= --prompt "def fibonacci(n):" --max-new-tokens 48

.PHONY: run test venv clean

$(BIN)/.installed: pyproject.toml constraints.txt
	@PYENV_VERSION=3.12.1 $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || \
	  { echo "jaxfire needs Python >= 3.12 (jax >= 0.11); set PY=/path/to/python3.12" >&2; exit 1; }
	PYENV_VERSION=3.12.1 $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PIP_CONSTRAINT= $(BIN)/python -m pip install -q -c constraints.txt -e '.[test,bench]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/python -m jaxfire.generate $(ARGS)

test: venv
	$(BIN)/python -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV)
