# fct-lightning: install, test, demo and reproduction targets.
# `make demo` and `make test` set themselves up (a virtual environment in $(VENV)) and work offline.
# Reproduction: `make <dataset>` runs the whole chain (old, side_info, new, transformation with and without
# side-info, bct, fct-eval, fct-report); `make <dataset>-<stage>` runs one stage and what it needs.
# A stage's target is its done.json, which fct-fit writes when the run completes (best.ckpt already exists after
# the first validation): re-running skips finished stages, resumes interrupted ones from their last.ckpt, and
# trains anew a stage whose upstream stage was re-trained after it.

PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed-stamp
SETUP     ?= $(STAMP)
ARTIFACTS ?= artifacts
SEED      ?= 0
# Each seed trains its own models: SEED=0 in $(ARTIFACTS)/<dataset>/<stage>/, SEED=N in
# $(ARTIFACTS)/seed<N>/<dataset>/<stage>/. Every seed's fct-eval writes $(ARTIFACTS)/<dataset>/results/seed<N>.json
# and fct-report gives the mean and standard deviation over them.
RUNS       = $(if $(filter 0,$(SEED)),$(ARTIFACTS),$(ARTIFACTS)/seed$(SEED))
DATA_ROOT ?=
TRAINER   ?=
RECIPE    ?=
DEVICES   ?=
EXTRA     ?=
POINTS    ?= 22
# datasets whose `make <dataset>` also runs the chain of model versions (configs/<dataset>/versions.yaml) and puts its
# compatibility matrix in the report; `make <dataset>-versions` runs it for any dataset with a plan
VERSIONS  ?= digits
PYTEST_ARGS ?=
FIT       ?= $(BIN)/fct-fit
EVAL      ?= $(BIN)/fct-eval
REPORT    ?= $(BIN)/fct-report
CIFAR10_ARCHIVE ?= ../shared/data/cifar10-jpeg.tar.gz
export OMP_NUM_THREADS ?= 2
# GNU OpenMP threads that spin while waiting make a 2-core machine crawl as soon as two processes compete
# (measured: one small training step 30x slower); passive waiting keeps that cost near zero.
export OMP_WAIT_POLICY ?= PASSIVE

DATASETS := digits cifar10 cifar100 imagenet places365 vggface2 folder

.PHONY: help install test test-all demo lint bench clean report $(DATASETS) $(foreach d,$(DATASETS),$(addprefix $(d)-,$(CHAIN_VARIANTS) eval report versions))

help:  ## list the targets and variables
	@echo "targets:"
	@grep -E '^[a-zA-Z0-9_%-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-24s %s\n", $$1, $$2}'
	@echo "  <dataset>                the whole chain + eval + report; datasets: $(DATASETS)"
	@echo "  <dataset>-<variant>      one variant (and its upstream ones); the variants, from src/fct_lightning/chain.py:"
	@if [ -x $(BIN)/fct-chain ]; then $(BIN)/fct-chain list | sed 's/^/    /'; else echo "    (make install, then $(BIN)/fct-chain list)"; fi
	@echo "  <dataset>-eval, <dataset>-report, <dataset>-versions (the chain of model versions v1 -> v2 -> v3)"
	@echo "variables: ARTIFACTS=$(ARTIFACTS) SEED=$(SEED) (SEED=N>0 trains in ARTIFACTS/seedN/) DATA_ROOT=<dataset root> TRAINER=<presets in configs/trainer, e.g. 'gpu-fast' or 'ddp bf16'>"
	@echo "           DEVICES=<n> EXTRA='<more fct-fit options>' POINTS=$(POINTS) (backfill curve points) VERSIONS='$(VERSIONS)' (datasets whose chain includes the versions)"
	@echo "           RECIPE=<folder in configs/recipes, one <stage>.yaml each: cifar10_cpu, folder_cpu, cifar100_resnet50>"

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create $(VENV) and install the package with its test tools

test: $(SETUP)  ## run the default (fast) test suite; "no tests collected" (pytest exit 5) is a failure
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: $(SETUP)  ## every test, the slow ones included
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

lint: $(SETUP)  ## static checks: ruff, and the import layers (no cycles, commands on top; see setup.cfg)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports --config setup.cfg

bench: $(SETUP)  ## CPU benchmarks (print ratios against reference implementations run in the same process)
	$(BIN)/python bench/bench_retrieval.py
	$(BIN)/python bench/bench_backfill.py
	$(BIN)/python bench/bench_transformation.py

# ----------------------------------------------------------------------------- reproduction chains
# The chain's variants (old, side_info, new, bct, transformation, ...; their stages and upstream variants) come from
# the registry in src/fct_lightning/chain.py: `fct-chain makefile` writes them to $(CHAIN_MK) as CHAIN_VARIANTS,
# STAGE_<variant> and UPSTREAM_<variant>, so a registered variant gets its targets without an edit here.
CHAIN_MK  := $(VENV)/chain.mk
NO_CHAIN  := help install test test-all lint bench clean
ifneq ($(filter-out $(NO_CHAIN),$(or $(MAKECMDGOALS),help)),)
include $(CHAIN_MK)
endif
$(CHAIN_MK): src/fct_lightning/chain.py | $(SETUP)
	@$(BIN)/fct-chain makefile > $@.tmp && mv $@.tmp $@

# $(1) = dataset, $(2) = the stage's config name (a RECIPE folder holds one file per stage). How a stage starts is
# fct-fit's decision (--resume auto): an interrupted run resumes from its last.ckpt, unless an upstream stage
# finished after it (the run then belongs to the previous upstream model); anything else trains anew, keeping the old
# checkpoints aside. make runs a stage only when its done.json is missing or older than an upstream one.
fit_opts = $(strip --dataset $(1) --artifacts $(RUNS) --seed $(SEED) $(if $(DATA_ROOT),--data.root $(DATA_ROOT)) \
	$(foreach t,$(TRAINER),--config configs/trainer/$(t).yaml) $(if $(RECIPE),--config configs/recipes/$(RECIPE)/$(2).yaml) \
	$(if $(DEVICES),--trainer.devices $(DEVICES)) $(EXTRA))
data_opts = $(if $(DATA_ROOT),--data_root $(DATA_ROOT))

# $(1) = dataset, $(2) = variant
define VARIANT
$(RUNS)/$(1)/$(2)/done.json: $(foreach u,$(UPSTREAM_$(2)),$(RUNS)/$(1)/$(u)/done.json) | $(SETUP) $(1)-data
	$$(FIT) --stage $(2) $$(call fit_opts,$(1),$(STAGE_$(2))) --resume auto
$(1)-$(2): $(RUNS)/$(1)/$(2)/done.json
endef
# $(1) = dataset
define CHAIN
$(ARTIFACTS)/$(1)/results/seed$(SEED).json: $(foreach v,$(CHAIN_VARIANTS),$(RUNS)/$(1)/$(v)/done.json)
	$$(EVAL) --dataset $(1) --artifacts $(RUNS) $$(data_opts) --backfill random,uncertainty,confident,distance --points $$(POINTS) --out $$@
$(ARTIFACTS)/$(1)/report.md: $(ARTIFACTS)/$(1)/results/seed$(SEED).json $(if $(filter $(1),$(VERSIONS)),$(RUNS)/$(1)/versions/results.json)
	$$(REPORT) --dataset $(1) --artifacts $(ARTIFACTS)
$(1): $(ARTIFACTS)/$(1)/report.md
$(1)-eval: $(ARTIFACTS)/$(1)/results/seed$(SEED).json
$(1)-report: $(ARTIFACTS)/$(1)/report.md
endef
# $(1) = dataset: the chain of model versions of configs/<dataset>/versions.yaml (fct-versions trains what the plan
# adds to the chain, v2 and the updates' h, each as an fct-fit run with the same TRAINER/RECIPE/DEVICES/EXTRA, then
# writes the compatibility matrices to $(RUNS)/<dataset>/versions/)
define VERSION_CHAIN
$(RUNS)/$(1)/versions/results.json: $(foreach v,old side_info new transformation,$(RUNS)/$(1)/$(v)/done.json) | $(SETUP) $(1)-data
	$(BIN)/fct-versions --dataset $(1) --artifacts $(RUNS) --seed $(SEED) $$(data_opts) $(if $(RECIPE),--recipe configs/recipes/$(RECIPE)) -- \
	  $(foreach t,$(TRAINER),--config configs/trainer/$(t).yaml) $(if $(DEVICES),--trainer.devices $(DEVICES)) $(EXTRA)
$(1)-versions: $(RUNS)/$(1)/versions/results.json
endef
$(foreach d,$(DATASETS),$(foreach v,$(CHAIN_VARIANTS),$(eval $(call VARIANT,$(d),$(v)))))
$(foreach d,$(DATASETS),$(eval $(call CHAIN,$(d))))
$(foreach d,$(DATASETS),$(eval $(call VERSION_CHAIN,$(d))))

# ----------------------------------------------------------------------------- data checks
# digits ships inside scikit-learn. CIFAR-10 can come from the JPEG archive; the others must be put in place.
digits-data:
	@true
cifar10-data:
	@root="$(or $(DATA_ROOT),$(FCT_DATA_ROOT),data)"; \
	if [ ! -d "$$root/cifar10/train" ] && [ ! -d "$$root/train" ] && [ ! -d "$$root/cifar-10-batches-py" ] \
	  && [ ! -d "$$root/cifar10/cifar-10-batches-py" ]; then \
	  if [ -f "$(CIFAR10_ARCHIVE)" ]; then mkdir -p "$$root" && tar xzf "$(CIFAR10_ARCHIVE)" -C "$$root" && echo "extracted $(CIFAR10_ARCHIVE) into $$root"; \
	  else echo "CIFAR-10 not found under $$root: put torchvision's cifar-10-batches-py/ there, or an ImageFolder tree $$root/cifar10/{train,test}/<class>/*.jpg (set DATA_ROOT=...)" >&2; exit 1; fi; fi
# $(1) = dataset, $(2)/$(3) = its split folders, $(4) = torchvision's folder for it, if any
define FOLDER_CHECK
$(1)-data:
	@root="$(or $(DATA_ROOT),$(FCT_DATA_ROOT),data)"; \
	if [ ! -d "$$$$root/$(2)" ] && [ ! -d "$$$$root/$(1)/$(2)" ] \
	  $(if $(4),&& [ ! -d "$$$$root/$(4)" ] && [ ! -d "$$$$root/$(1)/$(4)" ]); then \
	  echo "$(1) not found under $$$$root: expected $$$$root/$(2)/<class>/<image> and $$$$root/$(3)/<class>/<image> (or the same below $$$$root/$(1)/); set DATA_ROOT=<that folder>. See data/README.md." >&2; exit 1; fi
endef
$(eval $(call FOLDER_CHECK,cifar100,train,test,cifar-100-python))
$(eval $(call FOLDER_CHECK,imagenet,train,val))
$(eval $(call FOLDER_CHECK,places365,train,val))
$(eval $(call FOLDER_CHECK,vggface2,train,test))
$(eval $(call FOLDER_CHECK,folder,train,val))

# ----------------------------------------------------------------------------- the main job
demo: digits  ## the main job on digits (offline, CPU): the whole chain, eval with backfilling curves, report
	@cat $(ARTIFACTS)/digits/report.md

report: $(SETUP)  ## rebuild the report of DATASET (default digits) from all its results/*.json (several seeds)
	$(REPORT) --dataset $(or $(DATASET),digits) --artifacts $(ARTIFACTS)

clean:  ## remove artifacts (not the virtual environment, not the data)
	rm -rf $(ARTIFACTS) lightning_logs
