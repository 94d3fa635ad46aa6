# jaxllm — every target that needs the virtual environment depends on it, so a fresh clone needs nothing else.
# SYSTEM=1 runs with the interpreter's own packages instead (a machine with JAX installed and no package
# registry, such as a GPU image): `make report SYSTEM=1`, `make test SYSTEM=1`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ifdef SYSTEM
DEPS :=
PY := PYTHONPATH=$(CURDIR) $(PYTHON)
else
DEPS := $(STAMP)
PY := $(BIN)/python
endif
JAXLLM := $(PY) -m jaxllm
# The experiments run under the allocator the `jaxllm` command preloads itself (jaxllm/launch.py).
RUN := $(PY) -m jaxllm.launch

.PHONY: setup test test-all check fmt lint types clean bench

setup: $(STAMP)

# Rebuilt only when the package's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ckpt,plot,hf,serve,tensorboard]'
	touch $(STAMP)

test: $(DEPS)
	$(PY) -m pytest -q -m "not slow"

test-all: $(DEPS)
	$(PY) -m pytest -q

fmt: $(STAMP)
	$(BIN)/ruff format jaxllm tests experiments scripts
	$(BIN)/ruff check --fix jaxllm tests experiments scripts

lint: $(STAMP)
	$(BIN)/ruff format --check jaxllm tests experiments scripts
	$(BIN)/ruff check jaxllm tests experiments scripts

types: $(STAMP)
	$(BIN)/pyright

check: lint types test

# Train, prefill and decode of `small` and `gpt2` beside their roofline (minutes on a CPU; run it on a
# quiet machine). BENCH_FLAGS=--quick for short shapes.
bench: $(DEPS)
	$(JAXLLM) calibrate --refresh
	$(JAXLLM) bench $(BENCH_FLAGS)
	$(JAXLLM) serve-bench $(SERVE_BENCH)
	$(RUN) experiments/http_load.py

# The engine's target (issue 14): 64 requests at once, 8 slots, prompts 16-128, outputs 16-256 on
# `small` (its context widened to 512 to hold them): continuous >= 1.5x the tokens/s of static.
SERVE_BENCH := --preset small --override max_len=512 --policy static,continuous,chunked \
	--requests 64 --slots 8 --prompt-lens 16-128 --output-lens 16-256

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The main job: train `small` on the built-in corpus, sample from it, run every experiment, write
# report/REPORT.md. Under 10 minutes on 2 CPU cores. On a GPU or TPU the experiments use gpt2-medium in
# bf16, decode batches up to 1024 and sequences up to the context (`make report SYSTEM=1` where JAX is
# installed and no registry is reachable).
REPORT_RUN := runs/report
# The list lives in jaxllm/experiment.py (report.py gathers the same); read once the package is installed.
EXPERIMENTS = $(shell $(PY) -c 'from jaxllm.experiment import EXPERIMENTS; print(*EXPERIMENTS)')

.PHONY: report
report: $(DEPS)
	rm -rf $(REPORT_RUN) && mkdir -p report
	$(JAXLLM) calibrate --refresh
	$(JAXLLM) train --out $(REPORT_RUN)
	$(JAXLLM) generate --checkpoint $(REPORT_RUN) --prompts-file experiments/prompts.txt \
		--max-new-tokens 160 --temperature 0.8 --top-k 40 --seed 0 --json > report/samples.json
	for e in $(EXPERIMENTS); do echo "== experiment $$e"; $(RUN) experiments/$$e.py || exit 1; done
	$(PY) experiments/report.py --run $(REPORT_RUN)
