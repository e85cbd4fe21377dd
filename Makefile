# `make job` and `make test` do all set-up on a fresh machine: they create .venv,
# install the pinned versions from constraints-ci.txt, and then run.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: job test lint format bench clean

$(STAMP): pyproject.toml constraints-ci.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# torch first and pinned, so that nothing pulls a CUDA build as a dependency.
	$(PYTHON) -m pip install -q -c constraints-ci.txt torch
	$(PYTHON) -m pip install -q -c constraints-ci.txt -e ".[examples,dev]"
	touch $(STAMP)

job: $(STAMP)
	$(VENV)/bin/contrasim-finetune-shakespeare $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
