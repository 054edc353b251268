# ivmix — `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build on dev/CI machines; on a GPU box: make venv TORCH="torch==2.13.0 --index-url <your CUDA index>"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml .ci/constraints.txt | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test test-all bench tiny clean

venv: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/python -m pipelines.tiny animatediff .cache/tiny/animatediff
	$(BIN)/python -m pipelines.sample --model-dir .cache/tiny/animatediff --device cpu \
		--prompt "Two horses race across a grassy field at sunset." --sampler ivmixed \
		--steps 8 --frames 8 --height 64 --width 64 --seed 23523 --out outputs/demo/ivmixed.mp4

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q -rs

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -rs

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_overhead.py

tiny: $(STAMP)
	$(BIN)/python -m pipelines.tiny animatediff .cache/tiny/animatediff

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache
