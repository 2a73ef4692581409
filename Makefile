# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo
SEEDS ?= 0,1,2
JOBS ?= 1
comma := ,
FIRST_SEED = $(firstword $(subst $(comma), ,$(SEEDS)))

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

# One recipe run per seed (runs/demo/tiny/seed-N/REPORT.md) and SEEDS.md, the per-seed table and its
# spread; `make demo SEEDS=0` for one run, JOBS=2 to run two seeds at once on 2+ cores.
demo: setup
	$(BIN)/phi4rv recipe --preset tiny --seeds $(SEEDS) --jobs $(JOBS) --out $(DEMO)/tiny
	$(BIN)/phi4rv chat --model $(DEMO)/tiny/seed-$(FIRST_SEED)/model \
		--image $(DEMO)/tiny/seed-$(FIRST_SEED)/example_1.png \
		--max-new-tokens 48 --temperature 0 "What is the sum of the numbers on the cards?"

test: setup-dev
	$(BIN)/ruff check phi4rv tests bench
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
