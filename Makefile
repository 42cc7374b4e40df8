# nucbook: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# runs never reach the network for models; albumentations must not ask for updates
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: venv demo test check-sync nbtest pytest export clean-nbs docs bench outputs gpu-check lab help
help:
	@echo "make demo   run the main notebook (CPU smoke profile, synthetic data) into runs/"
	@echo "make test   check notebooks/library are in sync and clean, run notebook tests and pytest"
	@echo "make export regenerate nucbook/ from nbs/ and clean the notebooks"
	@echo "make lab    JupyterLab on 127.0.0.1 (repo root, opens nbs/, the .venv kernel); LAB_ARGS=\"--no-browser --port=8899\""
	@echo "make bench  run the benchmark scripts (figures printed)"
	@echo "make gpu-check  on a GPU (H100/H200, < 8 min): paper-size train steps and samplers, speed, memory, TFLOP/s, GPU-vs-CPU checks"
	@echo "make outputs re-run the walkthrough and paper notebooks (smoke) and store their outputs for the site"

# (Re)create .venv when it is missing or pyproject.toml (the pins) changed since it was built.
venv:
	@want=$$(sha256sum pyproject.toml | cut -d' ' -f1); \
	have=$$(cat $(VENV)/.pins 2>/dev/null || true); \
	if [ ! -x $(BIN)/python ] || [ "$$want" != "$$have" ]; then \
	  echo "== setting up $(VENV) (pins changed or venv missing; takes ~3 minutes)"; \
	  rm -rf $(VENV); $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	  $(BIN)/python -c "import nucbook, torch, papermill, nbdev, jupyterlab" || { echo "venv set-up failed"; exit 1; }; \
	  echo "$$want" > $(VENV)/.pins; \
	fi

demo: venv
	$(BIN)/nucbook run 11_insmix --profile smoke

export: venv
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

# JupyterLab from .venv on loopback, rooted here, opening nbs/, with the venv's python3 kernel (tools/lab.sh).
LAB_ARGS ?=
lab: venv
	bash tools/lab.sh $(LAB_ARGS)

# Fail if nbdev-export or nbdev-clean would change any file.
check-sync: venv
	bash .ci/check-sync

nbtest: venv
	$(BIN)/python .ci/proc-docs.py
	$(BIN)/nbdev-test --timing

pytest: venv
	$(BIN)/python -m pytest -n 2 tests

test: check-sync nbtest pytest

bench: venv
	@for f in $$(ls benchmarks/*.py | grep -v gpu_check.py); do echo "== $$f"; $(BIN)/python $$f; done

# Refresh the stored outputs (figures, tables) of the walkthrough and paper notebooks from their smoke runs.
outputs: venv
	$(BIN)/python tools/store_outputs.py

gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py

docs: venv
	@command -v quarto >/dev/null || { echo "Quarto is not installed (see README: Docs)"; exit 1; }
	$(BIN)/nbdev-docs
