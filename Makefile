# The README's two commands: `make train` and `make test`. Each sets up first (`make setup`),
# so either works alone on a fresh machine.

VENV    := .venv
PY      := $(VENV)/bin/python
# megatron-core 0.19 needs Python 3.12: take python3.12 from PATH, else pyenv's, else /usr/bin.
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $$p && break; done)
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test train clean

setup: $(STAMP)

$(STAMP): setup.py requirements/tested.txt
	@test -n "$(PYTHON312)" || { echo "make setup: no Python 3.12 found (megatron-core 0.19 needs it); set PYTHON312=/path/to/python3.12"; exit 1; }
	@echo "== creating $(VENV) with $(PYTHON312) and installing phi4-megatron[test] at the tested versions (torch is a ~5.5 GB CUDA build)"
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -c requirements/tested.txt -e '.[test]'
	touch $(STAMP)

# Two workers, each module whole on one (its fixtures are built once), in the order tests/conftest.py
# gives (the SLURM stage chain first, then the modules with the most tests). TEST_WORKERS=0: serially.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

train: $(STAMP)
	$(VENV)/bin/phi4-train

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
