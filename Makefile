# iunet-notebooks -- every target uses .venv/bin/... explicitly; no activation needed.
#
#   make setup      create .venv/ and install everything (idempotent, stamp file)
#   make test       run the whole test suite
#   make lab        start JupyterLab on notebooks/
#   make table      print the memory table (Table 1 of the paper, re-measured)
#   make notebooks  re-execute every notebook in place with papermill
#   make clean      remove build artefacts (keeps .venv/)

SHELL := /bin/bash
.DEFAULT_GOAL := test

# Interpreter used only to create the venv.
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV  := .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.setup-done

.PHONY: setup test lab table notebooks clean

setup: $(STAMP)

# Order matters:
#  1. torch first, pinned, so that nothing later can pull a different (CUDA) build;
#  2. the reference libraries with --no-deps: their declared dependencies
#     (torchvision, SimpleITK, ...) would replace torch with a multi-GB CUDA build
#     and are not used by anything here (pins also in pyproject's [tool.iunet_nb]);
#  3. this package with its pinned dependencies and extras;
#  4. Chromium from Debian for the browser tests (never `playwright install`).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps memcnn==1.5.2 iunets==0.1
	$(PIP) install -e '.[test,notebooks,apps]'
	@if [ -x /usr/bin/chromium ]; then \
	    echo "chromium: /usr/bin/chromium present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	     && apt-get update \
	     && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; then \
	    echo "chromium: installed from Debian"; \
	else \
	    echo "chromium: could not install /usr/bin/chromium (not root or apt-get failed);"; \
	    echo "          browser tests will be skipped. As root: apt-get install -y chromium"; \
	fi
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Jupyter refuses to run as root without --allow-root (CI containers run as root).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

table: $(STAMP)
	$(PY) -m iunet_nb.bench table1

notebooks: $(STAMP)
	@set -e; for nb in notebooks/*.ipynb; do \
	    [ -e "$$nb" ] || continue; \
	    echo "== $$nb"; \
	    $(VENV)/bin/papermill "$$nb" "$$nb" --cwd notebooks; \
	done

clean:
	rm -rf build dist *.egg-info .pytest_cache tests/_artifacts
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
	    \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 | xargs -0 rm -rf
