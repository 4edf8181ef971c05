# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Both create and fill .venv on first use. TORCH_SPEC pins the torch release the tests are run with. On a
# stock package index that pin is the default build, which on Linux x86-64 is the CUDA one (a few GB of
# wheels); TORCH_INDEX=<PyTorch's CPU wheel index> installs the CPU-only build instead (README).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m agents.hepo --env ads-v0 --out runs/demo/hepo --pretrain-dir runs/demo/pretrain
	$(BIN)/python -m agents.evaluate --env ads-v0 --sessions 512 --out runs/demo/eval \
		--agents random,learned-cascade:runs/demo/pretrain/platform,cascade-privileged,oracle,gpr:runs/demo/pretrain/vaft,gpr:runs/demo/hepo,gpr:runs/demo/hepo/best

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
