# fastbus: `make demo` and `make test` each work on a fresh machine with Python 3.11+
# and a C compiler: they create .venv, install the build and test dependencies,
# and compile the Cython extensions in place before doing their job.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastbus-installed
BUILD_DEPS := "setuptools>=77" wheel "Cython>=3.1,<4" "numpy>=1.26" "cysignals>=1.11"
PERF_SMOKE := --debug-single-value --quiet
# pyperf options of `make bench`; `make bench BENCH_ARGS=--fast` for a shorter run.
BENCH_ARGS ?= --rigorous
PERF_SCRIPTS := $(wildcard perf/bench_*.py) perf/peers.py

.PHONY: all build demo test lint unit test-debug bench-smoke wheel-check bench bench-report docs wheel clean

all: build

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(BUILD_DEPS)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

# Incremental: only the extensions whose .pyx/.pxd/.h changed are rebuilt.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace -j 2

demo: build
	$(PY) -m fastbus demo

lint: $(STAMP)
	$(PY) -m ruff check .

unit: build
	$(PY) -m pytest -q

# The suite again on a debug build (bounds checks and invariant assertions on, the WAL's
# wake-up gate on a condition variable as on systems other than Linux), built
# out of tree in build/debug (a copy of the package and its tests) so the release build
# in place is untouched.
DEBUG_TESTS := tests/test_ring.py tests/test_partition.py tests/test_walcodec.py tests/test_scalable.py tests/test_wal_groupcommit.py tests/test_wal_groupcommit_faults.py tests/test_wal_races.py tests/test_segfile.py tests/test_issue_audit_rings.py
test-debug: $(STAMP)
	rm -rf build/debug && mkdir -p build/debug
	cp -r fastbus tests setup.py pyproject.toml build/debug/
	rm -f build/debug/fastbus/*.so build/debug/fastbus/*.c
	cd build/debug && FASTBUS_DEBUG_BUILD=1 ../../$(PY) setup.py -q build_ext --inplace -j 2
	cd build/debug && FASTBUS_TEST_DEBUG_BUILD=1 ../../$(PY) -m pytest -q -m "not slow" $(DEBUG_TESTS)

bench-smoke: build
	@set -e; for f in $(PERF_SCRIPTS); do \
		echo "== smoke: $$f"; $(PY) $$f $(PERF_SMOKE) >/dev/null || { echo "FAILED: $$f"; exit 1; }; \
	done; echo "bench smoke: every perf/ script ran"

# The packaging promise: a platform wheel (no .c, no compiler needed to install it) with
# the .pyi stubs and py.typed, and an sdist with the .pyx/.pxd sources but no generated C
# (tests/faultshim.c is a test's source). No --sdist --wheel: the wheel is built from the
# unpacked sdist, so an sdist that lacks a file the build needs fails here.
wheel-check: $(STAMP)
	rm -rf build/wheelcheck && mkdir -p build/wheelcheck
	$(PY) -m build -q -o build/wheelcheck/dist . >/dev/null
	@if tar tzf build/wheelcheck/dist/*.tar.gz | grep -E '\.so$$|/fastbus/[^/]*\.c$$'; then \
		echo "sdist carries generated files"; exit 1; fi
	@if unzip -l build/wheelcheck/dist/*.whl | grep -E '\.(c|pyx)$$'; then \
		echo "wheel carries sources"; exit 1; fi
	@for f in py.typed $(notdir $(wildcard fastbus/*.pyi)); do \
		unzip -l build/wheelcheck/dist/*.whl | grep -q " fastbus/$$f$$" || { \
		echo "wheel lacks fastbus/$$f"; exit 1; }; done
	$(PYTHON) -m venv build/wheelcheck/venv
	build/wheelcheck/venv/bin/python -m pip install -q build/wheelcheck/dist/*.whl
	cd build/wheelcheck && CC=/bin/false venv/bin/python -c "import fastbus, fastbus._partition as p; \
		assert 'wheelcheck/venv' in p.__file__, p.__file__; \
		assert fastbus.partition_for(b'foobar', 50) == 16; print('wheel ok:', p.__file__)"

test: lint unit test-debug bench-smoke docs wheel-check

# Every perf/ script, peers included, as pyperf JSON in perf/results/ (replaced).
bench: build
	$(PY) -m pip install -q -e ".[bench]" --no-build-isolation
	mkdir -p perf/results
	@set -e; for f in $(PERF_SCRIPTS); do \
		n=$$(basename $$f .py); rm -f perf/results/$$n.json; \
		echo "== bench: $$f $(BENCH_ARGS)"; \
		$(PY) $$f -o perf/results/$$n.json $(BENCH_ARGS); \
	done

# The documentation site (site/, git-ignored): MkDocs + mkdocstrings, the API reference
# generated from the docstrings and the .pyi stubs. --strict: every warning is an error.
# Part of `make test`: after a one-time install of the docs extra (~35 s) the build takes
# 2-6 s and needs nothing else, and it catches broken links and docstrings that fail to render.
# The extra's packages only: `pip install -e .[docs]` would rebuild fastbus for nothing.
DOCS_STAMP := $(VENV)/.fastbus-docs-installed
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))' > $(VENV)/docs-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/docs-requirements.txt
	touch $@

docs: build $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# docs/benchmarks.md and docs/benchmarks.png from the JSON of `make bench`.
bench-report: $(STAMP)
	@ls perf/results/*.json >/dev/null 2>&1 || { \
		echo "no perf/results/*.json: run 'make bench' (or 'make bench BENCH_ARGS=--fast') first"; \
		exit 1; }
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[bench]" --no-build-isolation
	$(PY) perf/report.py perf/results --md docs/benchmarks.md --png docs/benchmarks.png

# The sdist, then the wheel built from it (not from this tree: what the sdist forgot fails here).
wheel: $(STAMP)
	$(PY) -m build -o dist .

clean:
	rm -rf build dist *.egg-info fastbus/*.c fastbus/*.so fastbus/*.html
