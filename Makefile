# `make job` and `make test` do all set-up on a fresh machine: they create .venv,
# install the pinned versions from constraints-ci.txt, and then run.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: job test lint format bench clean

$(STAMP): pyproject.toml constraints-ci.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# torch first and pinned, so that no dependency asks for a newer one. Which build pip takes depends on the
	# machine: where a local CPU wheel is configured (as on CI) that one, elsewhere PyPI's default build, which
	# includes CUDA on Linux. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu asks for the CPU build.
	$(PYTHON) -m pip install -q -c constraints-ci.txt $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch
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

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_measures.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
