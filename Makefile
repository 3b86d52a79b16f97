# fct-lightning: install, test, demo and reproduction targets.
# `make demo` and `make test` set themselves up (a virtual environment in $(VENV)) and work offline.

PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed-stamp
ARTIFACTS ?= artifacts
SEED      ?= 0
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 2

.PHONY: help install test test-all demo lint bench clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_%-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-22s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create $(VENV) and install the package with its test tools

test: $(STAMP)  ## run the default (fast) test suite; "no tests collected" (pytest exit 5) is a failure
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: $(STAMP)  ## run every test, the slow ones included
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

lint: $(STAMP)  ## static checks
	$(BIN)/ruff check src tests bench

DIGITS := $(ARTIFACTS)/digits

$(DIGITS)/old/best.ckpt: $(STAMP)
	$(BIN)/fct-fit --stage old --dataset digits --artifacts $(ARTIFACTS) --seed_everything $(SEED)
$(DIGITS)/new/best.ckpt: $(STAMP)
	$(BIN)/fct-fit --stage new --dataset digits --artifacts $(ARTIFACTS) --seed_everything $(SEED)

demo: $(DIGITS)/old/best.ckpt $(DIGITS)/new/best.ckpt  ## the main job on digits, offline
	$(BIN)/fct-eval --dataset digits --artifacts $(ARTIFACTS)

clean:  ## remove artifacts (not the virtual environment)
	rm -rf $(ARTIFACTS) lightning_logs
