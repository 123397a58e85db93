# Idempotent set-up of .venv behind the README's two commands.
#   make quickstart   set up (first time: a few minutes) and run experiments/quickstart.yaml
#   make test         set up and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision are pinned here (not in pyproject) to the builds this workplace has on disk;
# pyproject only states lower bounds.
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

quickstart: setup
	$(BIN)/detrdistill run experiments/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

clean-results:
	rm -rf results mlflow.db mlartifacts runs
