# Build and test infrastructure for couchdb-session.
#
#   make test     install everything, then run the tests
#   make demo     run tools/demo.py
#   make bench    run benchmarks/bench_session.py ($(BENCH_ARGS) passed on),
#                 benchmarks/bench_jobs.py ($(BENCH_JOBS_ARGS)) and
#                 benchmarks/bench_cpu.py ($(BENCH_CPU_ARGS))
#   make clean    remove the virtualenv, node_modules and caches
#
# Set COUCHDB_URL (e.g. http://admin:admin@127.0.0.1:5984/) to test against
# an existing CouchDB server instead of the in-memory PouchDB Server.

PYTHON ?= python3
NPM ?= npm
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed.stamp
NODE_STAMP := node_modules/.installed.stamp

PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_JOBS_ARGS ?=

.PHONY: all install test demo bench clean

all: test

$(VENV_STAMP): setup.py pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip
	$(VENV_PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

$(NODE_STAMP): package.json package-lock.json
	$(NPM) ci --no-audit --no-fund
	touch $@

install: $(VENV_STAMP) $(NODE_STAMP)

test: install
	$(VENV_PYTHON) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV_PYTHON) tools/demo.py

bench: install
	$(VENV_PYTHON) benchmarks/bench_session.py $(BENCH_ARGS)
	$(VENV_PYTHON) benchmarks/bench_jobs.py $(BENCH_JOBS_ARGS)
	$(VENV_PYTHON) benchmarks/bench_cpu.py $(BENCH_CPU_ARGS)

clean:
	rm -rf $(VENV) node_modules build dist *.egg-info .eggs \
		.pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './.git/*' \
		-exec rm -rf {} +
