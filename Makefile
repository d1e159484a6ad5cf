# stalwart developer commands. Each target creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 numpy
	$(PY) -m pip install -q -e '.[test,fast]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# The suite runs offline in a private network namespace (tests/isolated.py); what it needs from the
# network is fetched first.
test: $(STAMP)
	$(PY) tests/health/prometheus_bin.py
	$(PY) tests/isolated.py $(PY) -m pytest tests

bench: $(STAMP)
	$(PY) bench/recovery.py
	$(PY) bench/detection.py
	$(PY) bench/checkpoint.py
	$(PY) bench/standby.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
