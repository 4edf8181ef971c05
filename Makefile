# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Both create and fill .venv on first use. TORCH_SPEC pins the build so pip never pulls
# gigabytes of CUDA wheels by accident; override it for a GPU machine (e.g. TORCH_SPEC=torch).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m agents.hepo --env ads-v0 --out runs/demo/hepo --pretrain-dir runs/demo/pretrain
	$(BIN)/python -m agents.evaluate --env ads-v0 --sessions 512 --out runs/demo/eval \
		--agents random,cascade,oracle,gpr:runs/demo/pretrain/vaft,gpr:runs/demo/hepo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
