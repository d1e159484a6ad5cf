# stalwart developer commands. Each target creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean gpu-wheels

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

# Wheels that a GPU machine without PyPI needs for bench/gpu_check.sh (its Python is 3.12)
gpu-wheels:
	rm -rf .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
		crc32c crc32c-rs==0.0.7 boto3 botocore s3transfer jmespath

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
