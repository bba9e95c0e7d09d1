# Idempotent targets: the first one creates .venv and installs the pinned stack (constraints.txt);
# later calls reuse it. Offline data comes from Debian's dataset-fashion-mnist package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
FASHION_RAW := $(DATA_DIR)/FashionMNIST/raw/t10k-labels-idx1-ubyte
DEBIAN_FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup data smoke test bench clean

help:
	@echo "make smoke   prune ResNet-20 (random ERK, 90%), train 1 epoch on Fashion-MNIST, print the run record"
	@echo "make test    run the test suite (CPU, offline)"
	@echo "make bench   trainer throughput benchmark"
	@echo "make setup   create .venv with the pinned stack"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade-strategy only-if-needed -c constraints.txt -e '.[dev]'
	touch $@

$(DEBIAN_FASHION):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FASHION_RAW)

$(FASHION_RAW): $(DEBIAN_FASHION) | $(VENV)/.installed
	$(PY) -m dpai_lib data fashion_mnist --data-dir $(DATA_DIR)

smoke: setup data
	$(PY) -m dpai_lib train params/smoke.yaml --records runs/records

test: setup data
	$(PY) -m pytest -q

bench: setup data
	$(PY) -m dpai_lib.bench train

clean:
	rm -rf runs _build .pytest_cache
