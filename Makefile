# Two commands do all the set-up on a fresh clone: `make bench` and `make test`.
# Each creates .venv when missing, installs torch==2.13.0 only when no torch is importable there (a CPU wheel
# on disk; a loose `torch` requirement would pull gigabytes of CUDA wheels), builds the native module and
# installs tierkv with its test extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
SOURCES := pyproject.toml CMakeLists.txt $(shell find src csrc -type f -not -name '*.pyc' 2>/dev/null)

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

# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
test: $(VENV)/.tierkv
	$(PY) -m pytest -q tests; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests"; \
	  [ $$rc -eq 0 ] || exit 1
	TIERKV_FORCE_REFERENCE=1 $(PY) -m pytest -q -m "not slow" tests; rc=$$?; \
	  [ $$rc -ne 5 ] || echo "pytest collected no tests"; [ $$rc -eq 0 ] || exit 1

bench: $(VENV)/.tierkv
	$(VENV)/bin/tierkv bench

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis bench-results
