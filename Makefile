# Two commands do all the set-up on a fresh clone: `make bench` and `make test`.
# Each creates .venv when missing, installs torch==2.13.0 only when no torch is importable there (a CPU wheel
# on disk; a loose `torch` requirement would pull gigabytes of CUDA wheels), builds the native module and
# installs tierkv with its test extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
SOURCES := pyproject.toml CMakeLists.txt $(shell find src csrc -type f -not -name '*.pyc' 2>/dev/null)

VLLM_VERSION ?= 0.32.0

.PHONY: test test-reference bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	touch $@

# Rebuilt whenever a source changes, so the native module never goes stale behind the tests.
$(VENV)/.tierkv: $(VENV)/.torch $(SOURCES)
	$(PIP) install "scikit-build-core>=0.10" "nanobind>=2.0"
	$(PIP) install --no-build-isolation -e ".[test]"
	$(PY) -c "import tierkv, tierkv.ops as o; print('tierkv', tierkv.__version__, '-', o.native_status())"
	touch $@

install: $(VENV)/.tierkv

# vLLM for the connector's contract tests, without its CUDA dependencies (vllm and xgrammar with --no-deps, then
# the light packages its scheduler imports); installed once per .venv, again when the list changes.
$(VENV)/.vllm: requirements/vllm-test.txt | $(VENV)/.torch
	$(PIP) install --no-deps vllm==$(VLLM_VERSION) xgrammar==0.2.8
	$(PIP) install -r requirements/vllm-test.txt
	$(PY) -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
test: $(VENV)/.tierkv $(VENV)/.vllm
	$(PY) -m pytest -q tests; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests"; \
	  [ $$rc -eq 0 ] || exit 1
	TIERKV_FORCE_REFERENCE=1 $(PY) -m pytest -q -m "not slow" tests; rc=$$?; \
	  [ $$rc -ne 5 ] || echo "pytest collected no tests"; [ $$rc -eq 0 ] || exit 1

bench: $(VENV)/.tierkv
	$(VENV)/bin/tierkv bench

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis bench-results
