# Two commands from a fresh clone: `make demo` (whole pipeline, offline, tiny model) and `make test`.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test samples clean browser

$(BIN)/ocr-finetune: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	touch $@

install: $(BIN)/ocr-finetune

# The whole pipeline on the shipped sample corpus. `dvc repro` skips what is already up to date.
demo: install
	time dvc repro
	dvc metrics show
	@echo "report: metrics/eval.json, metrics/eval_per_doc.json, metrics/train_loss.csv; 'dvc plots show' draws them"

# Debian chromium: the tests check the HTML report and the offline plots in a real headless browser; a Korean
# font (Nanum) so that the report's Korean pages render as text, not as empty boxes.
browser:
	{ command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi nanum; } || { $$(command -v sudo) apt-get update -q && DEBIAN_FRONTEND=noninteractive $$(command -v sudo) apt-get install -y -q chromium fonts-nanum; }

test: install
	$(BIN)/python -m pytest -q tests

# Regenerate the sample corpus (deterministic: the files come out byte-identical).
samples: install
	$(BIN)/python -c 'from ocr_finetune.samples import write_corpus; write_corpus("data/samples")'

clean:
	rm -rf data/pages data/labels data/dataset models/adapter metrics/*.csv metrics/eval_pages.jsonl
