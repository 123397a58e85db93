# Idempotent set-up of .venv behind the README's two commands.
#   make quickstart   set up (first time: a few minutes) and run experiments/quickstart.yaml
#   make test         set up and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every version comes from constraints.txt (pyproject only states lower bounds); `make constraints` renews it.
PIN    := -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test clean-results constraints

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIN) torch torchvision
	$(BIN)/python -m pip install -q $(PIN) -e '.[test]'
	touch $(STAMP)

quickstart: setup
	$(BIN)/detrdistill run experiments/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

clean-results:
	rm -rf results mlflow.db mlartifacts runs

# A fresh venv resolved from pyproject.toml alone (every extra), frozen into constraints.txt.
constraints:
	rm -rf /tmp/detrdistill-pin && $(PYTHON) -m venv /tmp/detrdistill-pin
	/tmp/detrdistill-pin/bin/python -m pip install -q -e '.[test,hf,dashboard]'
	{ sed -n '1,2p' constraints.txt; /tmp/detrdistill-pin/bin/python -m pip freeze --exclude-editable \
	  | grep -v '^detrdistill'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf /tmp/detrdistill-pin
