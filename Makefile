# Quick start: `make train` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install the pinned set (constraints.txt) into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Data: --data via DATA=..., else $LUNGTF_DATA, else data/, else ../shared (when present), else download.
DATA ?=
TRAIN_ARGS ?=

.PHONY: train test venv lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,demo]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m lungtf.train $(if $(DATA),--data $(DATA)) $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check lungtf tests bench serving

clean:
	rm -rf $(VENV) build *.egg-info
