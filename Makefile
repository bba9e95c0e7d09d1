# Idempotent targets: the first one creates .venv and installs the pinned stack (constraints.txt);
# later calls reuse it. Offline data comes from Debian's dataset-fashion-mnist package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN = $(dir $(PY))
DATA_DIR ?= data
FASHION_RAW := $(DATA_DIR)/FashionMNIST/raw/t10k-labels-idx1-ubyte
DEBIAN_FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The book: built into $(BOOK_OUT)/_build/html. MathJax 3 is unpacked from the npm registry into the
# ignored .cache/ and served from the book (_static/mathjax), so pages load nothing from the network.
BOOK_OUT ?= .
MATHJAX_VERSION := 3.2.2
MATHJAX_DIR := .cache/mathjax
MATHJAX := $(MATHJAX_DIR)/static/mathjax/tex-chtml.js
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json

.PHONY: help setup data smoke lint test bench gpu-check book book-build lab browser clean

help:
	@echo "make book    set up, run the smoke tier of artefacts without data, collect, build the book (offline)"
	@echo "make test    lint, then run the test suite (CPU, offline), including the book build and its browser check"
	@echo "make lint    ruff and mypy"
	@echo "make smoke   prune ResNet-20 (random ERK, 90%), train 1 epoch on Fashion-MNIST, print the run record"
	@echo "make lab     JupyterLab with jupytext: book/ and book/experiments/ .md files open as notebooks"
	@echo "make bench   trainer throughput benchmark"
	@echo "make gpu-check  the CUDA paths, DPaI on CUDA vs CPU, throughput and a Fashion-MNIST run (one GPU, <= 8 min)"
	@echo "make setup   create .venv with the pinned stack"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade-strategy only-if-needed -c constraints.txt -e '.[dev,book]'
	touch $@

$(DEBIAN_FASHION):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FASHION_RAW)

$(FASHION_RAW): $(DEBIAN_FASHION) | $(VENV)/.installed
	$(PY) -m dpai_lib data fashion_mnist --data-dir $(DATA_DIR)

smoke: setup data
	$(PY) -m dpai_lib train params/smoke.yaml --records runs/records

# Debian's chromium for tests/test_book.py (Playwright drives it; `playwright install` is never run).
browser:
	@if ! command -v chromium >/dev/null; then \
	  if command -v apt-get >/dev/null; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; \
	  else echo "no chromium and no apt-get: tests/test_book.py will skip its browser checks"; fi; fi

# ruff (pyproject [tool.ruff]) over the code and tests; mypy over the modules listed in [tool.mypy]
lint: setup
	$(BIN)ruff check .
	$(BIN)mypy

test: setup data browser lint
	$(PY) -m pytest -q

bench: setup data
	$(PY) -m dpai_lib.bench train

# One CUDA device, <= 8 minutes (dpai_lib/gpu_check.py): stops at once with one line where there is none;
# writes $(GPU_CHECK_OUT)/gpu_check.json, which book/cpu_fmnist.md shows.
GPU_CHECK_OUT ?= results/gpu_check
gpu-check: setup
	@$(PY) -c "import sys, torch; from dpai_lib.gpu_check import no_cuda_message as m; \
	  torch.cuda.is_available() or sys.exit(m())"
	@$(MAKE) --no-print-directory data
	$(PY) -m dpai_lib.gpu_check --out $(GPU_CHECK_OUT)

# The smoke tier runs on generated data (no data set needed); a run that already has a record is skipped.
book: setup
	$(PY) -m dpai_lib fill --tier smoke --jobs 2
	$(PY) -m dpai_lib collect
	$(MAKE) --no-print-directory book-build
	@echo "The book: open $(abspath $(BOOK_OUT))/_build/html/index.html"

# The build alone, from the results as they are (tests/test_book.py runs it with BOOK_OUT=<tmp>). Every
# page is re-read and re-executed (--all, execute_notebooks: force): pages read result files that change
# without their source changing. Fails on any warning, then on any script or stylesheet from the network.
book-build: $(MATHJAX)
	$(BIN)jupyter-book build . --all --warningiserror --keep-going --path-output $(BOOK_OUT)
	@if grep -rlE '<(script|link)[^>]*(src|href)="(https?:)?//' $(BOOK_OUT)/_build/html --include='*.html'; then \
	  echo "the pages above load a script or stylesheet from the network"; exit 1; fi

$(MATHJAX):
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq npm; }
	rm -rf $(MATHJAX_DIR) && mkdir -p $(MATHJAX_DIR)/static
	cd $(MATHJAX_DIR) && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null && tar -xzf mathjax-$(MATHJAX_VERSION).tgz
	cp $(MATHJAX_DIR)/package/LICENSE $(MATHJAX_DIR)/package/es5/LICENSE
	mv $(MATHJAX_DIR)/package/es5 $(MATHJAX_DIR)/static/mathjax
	rm -rf $(MATHJAX_DIR)/package $(MATHJAX_DIR)/mathjax-$(MATHJAX_VERSION).tgz

# jupytext's contents manager is a server extension enabled on install; the environment's JupyterLab
# settings make its notebook editor the default viewer of .md files.
lab: setup
	$(BIN)jupytext-config --settings-file $(LAB_OVERRIDES) set-default-viewer markdown myst
	$(BIN)jupyter server extension list 2>&1 | grep -q 'jupyterlab_jupytext.*enabled'
	$(BIN)jupyter lab $(if $(SUDO),,--allow-root)

clean:
	rm -rf runs _build .pytest_cache
