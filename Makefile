# Two commands on a fresh machine: `make demo` and `make test`.
# The install is keyed on constraints.txt + pyproject.toml: re-running a target on an installed tree
# does not touch pip (the stamp file names the hash of both).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KEY := $(shell cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(KEY)
export PATH := $(abspath $(BIN)):$(PATH)
PYTEST_ARGS ?=

.PHONY: install demo demo-snapshot showcase showcase-snapshot bench-showcase test lint format browser slurm \
	bench bench-gpu
SHOWCASE_CORES ?= 2
SHOWCASE_ARGS ?=

install: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "installed into $(VENV) (stamp $(notdir $@))"

# Debian's Chromium + ChromeDriver for the reader-study browser test (no browser download at run time).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { echo "installing chromium + chromium-driver (Debian packages)"; \
	    $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	    $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Debian's SLURM + MUNGE for the local-cluster test (tests/test_slurm.py starts and stops its own munged,
# slurmctld and slurmd in a temporary folder; nothing system-wide is configured or started).
slurm:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && \
	  command -v munged >/dev/null || \
	  { echo "installing slurm-wlm + munge (Debian packages)"; \
	    $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	    $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq slurm-wlm munge >/dev/null; }

demo: $(STAMP)
	$(BIN)/snakemake

# Copy the last pipeline run's tables and figures into the committed snapshot (results/demo/). The
# pipeline never writes there: committed outputs at the pipeline's own paths would look up to date to
# Snakemake on a fresh clone.
demo-snapshot:
	@test -f results/tables/main.md || { echo "results/tables/main.md missing: run 'make demo' first"; exit 1; }
	rm -rf results/demo/tables results/demo/figures
	mkdir -p results/demo
	cp -r results/tables results/demo/tables
	cp -r results/figures results/demo/figures
	rm -f results/demo/figures/.snakemake_timestamp

# The showcase (scales.showcase in params.yaml): vmddpm and unet_attn on BraTS2018 phantoms, trained on CPU
# until their samples look like the data (~40 min on 2 cores: the two train jobs run side by side, one
# thread each). Everything it writes lands under showcase/ (data, runs, results) and logs/showcase/, apart
# from the demo's; it shares mlflow.db (its runs are tagged scale=showcase).
showcase: $(STAMP)
	$(BIN)/snakemake --cores $(SHOWCASE_CORES) --config scale=showcase $(SHOWCASE_ARGS)

# Copy the showcase's figures, tables and evaluation histories into the committed snapshot
# (results/showcase/; see results/README.md).
showcase-snapshot:
	@test -f showcase/results/tables/main.md || { echo "showcase/results/tables/main.md missing: run 'make showcase' first"; exit 1; }
	rm -rf results/showcase/tables results/showcase/figures results/showcase/eval_history
	mkdir -p results/showcase/eval_history
	cp -r showcase/results/tables results/showcase/tables
	cp -r showcase/results/figures results/showcase/figures
	rm -f results/showcase/figures/.snakemake_timestamp
	for f in showcase/runs/*/*/train/eval_history.csv; do \
	  run=$$(dirname "$$(dirname "$$f")"); \
	  cp "$$f" "results/showcase/eval_history/$$(basename "$$(dirname "$$run")")_$$(basename "$$run").csv"; \
	done

# `make showcase` on a fresh clone of HEAD (the install excluded: it reuses this .venv), timed, and the
# acceptance figures from its own outputs -> results/benchmarks/showcase.json. About 45 min; not in `make test`.
bench-showcase: $(STAMP)
	$(BIN)/python benchmarks/bench_showcase.py --cores $(SHOWCASE_CORES)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) browser slurm lint
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Each writes JSON (+ a figure) to results/benchmarks/; run on a quiet machine (about an hour on 2
# cores, most of it attention at 256^2 in bench_scaling and the 1000-step DDPM runs). bench_demo runs
# the whole demo DAG on a fresh copy.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scan.py
	$(BIN)/python benchmarks/bench_pscan_memory.py
	$(BIN)/python benchmarks/bench_lean.py --baseline b1fb54a
	$(BIN)/python benchmarks/bench_scaling.py --threads 2
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_demo.py --cores 2

# On a GPU machine: every preset at paper scale (train step, images/s, peak memory, one sampling call),
# the S6 op per backend and the projected GPU-hours of the paper matrix -> results/benchmarks/gpu.{json,png}.
# Needs CUDA; `pip install -c constraints.txt -e '.[cuda]'` first for the mamba-ssm backend.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py
