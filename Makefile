# One-command set-up and runs. `make repro` and `make test` both create the environment first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
# The CPU machines this project is developed and tested on take this pair from local files;
# GPU users: `make setup TORCH_PIN=` after installing their own CUDA torch + torchvision.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
# dvc.yaml's stage commands call `python`: the project's environment comes first on PATH.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

# Offline by default: no telemetry. (The train stage's own local Ray binds to loopback only and
# runs without token auth; a cluster named by RAY_ADDRESS / ray.address keeps the user's auth.)
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export ITERATIVE_DO_NOT_TRACK ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.2
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

# glibc's allocator: keep big tensors' memory in the heap instead of mmap/munmap per tensor. On
# the CPU, segment-anything's fp32 encoder otherwise spends more time in the kernel's page faults
# than in its matrix products (vit_b, 1024 px, 1 thread: 29.0 s -> 15.2 s a forward, bit-identical;
# benchmarks/cpu_allocator.py). Inherited by dvc's stages, pytest and the Ray workers they start.
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 100000000000

.PHONY: setup repro variants base release-base test test-fast lint format bench clean-env

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if [ -n "$(TORCH_PIN)" ]; then $(BIN)/pip install --quiet $(TORCH_PIN); fi
	$(BIN)/pip install --quiet -e ".[pipeline,cluster,dev,onnx]"
	touch $@

setup: $(BIN)/.installed

# One MLflow parent run for the stage runs of this repro (pipeline/tracking.py).
repro: setup
	STABLE_SAM_RUN_GROUP=$${STABLE_SAM_RUN_GROUP:-repro-$$(date +%Y%m%d-%H%M%S)} $(BIN)/dvc repro
	$(BIN)/dvc metrics show

# The trained variants (ablate.variants in params.yaml): one DVC experiment each, queued, run one at
# a time in temporary copies (the workspace stays as it is), then compared. Run `make repro` first
# (the experiments take data, base and embeddings from its cache). Rerunning: `dvc exp remove NAME`.
variants: setup
	$(BIN)/python -m pipeline.variants
	$(BIN)/dvc exp run --run-all --jobs 1
	$(BIN)/dvc exp show --no-pager --only-changed

# The released base SAM's own pipeline (hours on 2 CPU cores; resumable), then its release into
# base/release/ (committed; pin the printed sha256 as sam.sha256 in params.yaml).
base: setup
	$(BIN)/dvc repro base/dvc.yaml
	$(BIN)/dvc metrics show metrics/pretrain.json metrics/tighten.json metrics/extend.json metrics/base_eval.json

release-base: setup
	$(BIN)/python -m pipeline.release_base

# Everything, slow end-to-end tests included (this is what CI runs), on TEST_WORKERS pytest-xdist
# workers: most slow tests wait on subprocesses (Ray, dvc, MLflow), so two workers share two cores
# well. `make test TEST_WORKERS=0` runs them one after the other in one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -m "slow or not slow" -n $(TEST_WORKERS) --dist load --maxschedchunk 1 -v --durations=15

test-fast: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python -m benchmarks.decoder_overhead
	$(BIN)/python -m benchmarks.sweep_cache
	$(BIN)/python -m benchmarks.onnx_decoder
	$(BIN)/python -m benchmarks.cpu_allocator
	$(BIN)/python -m benchmarks.train_step

clean-env:
	rm -rf $(VENV)
