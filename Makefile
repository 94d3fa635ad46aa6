# jaxllm — every target that needs the virtual environment depends on it, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-all check fmt lint types clean bench

setup: $(STAMP)

# Rebuilt only when the package's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ckpt,plot,hf]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

fmt: $(STAMP)
	$(BIN)/ruff format jaxllm tests experiments
	$(BIN)/ruff check --fix jaxllm tests experiments

lint: $(STAMP)
	$(BIN)/ruff format --check jaxllm tests experiments
	$(BIN)/ruff check jaxllm tests experiments

types: $(STAMP)
	$(BIN)/pyright

check: lint types test

# Train, prefill and decode of `small` and `gpt2` beside their roofline (minutes on a CPU; run it on a
# quiet machine). BENCH_FLAGS=--quick for short shapes.
bench: $(STAMP)
	$(BIN)/jaxllm calibrate --refresh
	$(BIN)/jaxllm bench $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The main job: train `small` on the built-in corpus, sample from it, run every experiment, write
# report/REPORT.md. Under 10 minutes on 2 CPU cores; the same command on a GPU machine reports that GPU.
REPORT_RUN := runs/report
EXPERIMENTS := roofline decode_batch memory seqlen estimates padding

.PHONY: report
report: $(STAMP)
	rm -rf $(REPORT_RUN) && mkdir -p report
	$(BIN)/jaxllm calibrate --refresh
	$(BIN)/jaxllm train --out $(REPORT_RUN)
	$(BIN)/jaxllm generate --checkpoint $(REPORT_RUN) --prompts-file experiments/prompts.txt \
		--max-new-tokens 160 --temperature 0.8 --top-k 40 --seed 0 --json > report/samples.json
	for e in $(EXPERIMENTS); do echo "== experiment $$e"; $(BIN)/python experiments/$$e.py || exit 1; done
	$(BIN)/python experiments/report.py --run $(REPORT_RUN)
