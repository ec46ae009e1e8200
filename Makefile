# Two entry points for a new user: `make demo` and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_IMAGE := resources/cmu_small_region.svs
CORES ?= 2

.PHONY: demo test lint dryrun clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch/torchvision first and pinned, so no other package pulls a different build.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(DEMO_IMAGE): | $(STAMP)
	$(PY) -m stmdit fetch-demo-image --out $(DEMO_IMAGE)

demo: $(STAMP) $(DEMO_IMAGE)
	start=$$(date +%s); \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake --cores $(CORES) all && \
	$(PY) -m stmdit demo-checks --results results && \
	echo "make demo: the workflow took $$(( $$(date +%s) - start )) s"

test: $(STAMP) $(DEMO_IMAGE)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake --lint

dryrun: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake -n all

clean:
	rm -rf results .snakemake
