# Set-up and entry points. `make demo` and `make test` each create .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CORES  ?= 2

.PHONY: setup demo paper test bench clean-demo

setup: $(VENV)/.installed

# torch is installed first and pinned (2.13.0): pip then takes the local CPU build instead of a CUDA one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The offline demo: builds the mini-cal model and demo images, extracts representations, runs the analyses.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/snakemake --cores $(CORES) --configfile config/demo.yaml

# The paper's settings (needs a GPU and the Hugging Face hub).
paper: setup
	$(BIN)/snakemake --cores $(CORES)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/bench_extraction.py

clean-demo:
	rm -rf results/demo resources/models/mini-cal
