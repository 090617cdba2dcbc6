# RadRegion: `make serve` starts the product, `make test` runs the suite, `make bench` prints the figures.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
STUDIES ?= ./studies
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= apps/radregion/model

.PHONY: install dev serve test bench clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) -q -e '.[dev]'
	touch $@

dev: $(VENV)/.dev

serve: install
	@test -f apps/radregion/main.py || { echo "make serve: the MONAI Label app (apps/radregion) does not exist yet" >&2; exit 2; }
	mkdir -p $(STUDIES)
	MONAILABEL_PYEXE=$(abspath $(PY)) $(VENV)/bin/monailabel start_server --app apps/radregion --studies $(STUDIES) \
		--host $(HOST) --port $(PORT) --conf model $(MODEL)

test: dev
	$(PY) -m pytest -q tests

bench: dev
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
