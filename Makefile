# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo

.PHONY: setup setup-dev demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned first: this is the CPU build on our machines; an unpinned torch pulls CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0

setup: $(BIN)/python
	$(BIN)/pip install -q -e .

setup-dev: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"

demo: setup
	$(BIN)/phi4rv recipe --preset tiny --out $(DEMO)/tiny
	$(BIN)/phi4rv chat --model $(DEMO)/tiny/model --image $(DEMO)/tiny/example_1.png \
		--max-new-tokens 48 --temperature 0 "What is the sum of the numbers on the cards?"

test: setup-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
