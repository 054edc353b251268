# ivmix — `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build on dev/CI machines; on a GPU box: make venv TORCH="torch==2.13.0 --index-url <your CUDA index>"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml .ci/constraints.txt | cksum | cut -d' ' -f1)
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo demo-lab mlflow-ui lint test-unit test test-all bench bench-memory bench-resume gpu-check device-wheels tiny clean

venv: $(STAMP)

# PYTHONWARNINGS: setuptools' advisory banner on every editable install of a flat layout (the root is on sys.path)
$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV): pip, then PyTorch, then the pinned dependencies (a few minutes on first use)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	PYTHONWARNINGS="ignore:Editable installation:Warning" \
		$(BIN)/python -m pip install -q -c .ci/constraints.txt -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/python jobs/generate.py --config jobs/configs/tiny.yaml \
		--manifest datasets/examples/smoke.parquet --output outputs/demo \
		--mlflow-uri sqlite:///outputs/mlflow.db --experiment demo
	@echo "videos: outputs/demo/videos  metadata: outputs/demo/metadata  MLflow: make mlflow-ui"

# the sampler lab on tiny models (docs/lab.md): 4 prompts x 9 samplers, paired comparison in the report
demo-lab: $(STAMP)
	$(BIN)/python jobs/generate.py --config jobs/configs/tiny-lab.yaml --output outputs/lab \
		--mlflow-uri sqlite:///outputs/mlflow.db --experiment lab
	@echo "report: outputs/lab/report/index.html  MLflow: make mlflow-ui"

# the demo's MLflow runs in a browser (http://127.0.0.1:5000; MLFLOW_PORT=... for another port)
mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db --port $${MLFLOW_PORT:-5000}

lint: $(STAMP)
	$(BIN)/ruff check .

# test-unit: no Ray, server, browser or model run (under a minute); test: all but the slow checks; test-all: everything.
# test and test-all run TEST_WORKERS test processes (pytest-xdist; each has its own session Ray): a job test waits on
# its actors much of the time, and the other process uses that core. TEST_WORKERS=0: one process. Tests marked `alone`
# (they compare rates measured within the test) run afterwards, by themselves.
TEST_WORKERS ?= 2
test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not integration and not heavy" -q -rs

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not alone" -q -rs --durations=40 -n $(TEST_WORKERS) --dist worksteal
	$(BIN)/python -m pytest -m "not slow and alone" -q -rs --durations=5

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "not alone" -q -rs -n $(TEST_WORKERS) --dist worksteal
	$(BIN)/python -m pytest -m "alone" -q -rs

# the wheels a bare, offline GPU image lacks for the GPU check (infra/gpu-check/wheels.txt; README "GPU check")
DEVICE_WHEELS ?= .device/wheels
device-wheels: $(STAMP)
	rm -rf $(DEVICE_WHEELS)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(DEVICE_WHEELS) -r infra/gpu-check/wheels.txt
	@du -sh $(DEVICE_WHEELS)

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_overhead.py
	$(BIN)/python benchmarks/pipeline_overhead.py
	$(BIN)/python benchmarks/actor_overlap.py
	$(BIN)/python benchmarks/bivdiff_stages.py

# peak memory of the published architectures at 16 x 512 x 512 on the CPU (~25 min, ~20 GB of random models in .cache)
bench-memory: $(STAMP)
	$(BIN)/python benchmarks/memory.py --json outputs/memory.json

# resume planning of a 10M-row manifest against 10M committed rows (~2 min, ~3 GB of temporary files)
bench-resume: $(STAMP)
	$(BIN)/python benchmarks/resume_scale.py --rows 10000000 --json outputs/resume_scale.json

# one command on a GPU machine (~8 min on an H100/H200): seconds per video, ms per call, peak memory, videos per hour
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --json outputs/gpu_check.json

tiny: $(STAMP)
	$(BIN)/python -m pipelines.fixtures.tiny animatediff .cache/tiny/animatediff

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache
