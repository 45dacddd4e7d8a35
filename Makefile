# Two entry points (README): `make demo` (set up + run the demo on the real data) and
# `make test` (set up + run the test suite). Both create ./.venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export MDKD_DATASETS ?= $(abspath ../shared/data)
# `make demo`: the MDKD pipeline, every stage (README); DEMO_CONFIG=... runs another config
DEMO_CONFIG ?= configs/LungCT/mdkd_faster_rcnn_R18_demo.yaml

.PHONY: setup demo test test-all benchmark

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev,rfdetr]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG)

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

benchmark: setup
	$(PY) tools/benchmark.py
