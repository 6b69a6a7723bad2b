# vnpacs: `make run` serves the embedded default; `make test` installs test needs, starts services, runs everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEBS_TEST := dcmtk
DEBS_BENCH := dcmtk orthanc orthanc-dicomweb

.PHONY: install install-test run test lint typecheck pytest services debs-test debs-bench bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test debs-test

run: install
	$(VENV)/bin/vnpacs serve

# Debian packages the tests talk to (DCMTK as the real DICOM peer). Installed only when missing.
debs-test:
	@missing=""; for p in $(DEBS_TEST); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

debs-bench:
	@$(MAKE) --no-print-directory debs-test DEBS_TEST="$(DEBS_BENCH)"

# PostgreSQL and Redis for the scale-out configuration: start them if they are not answering.
services:
	@bash .ci/services

lint: install-test
	$(VENV)/bin/ruff check storage pacs dicomweb tests bench
	$(VENV)/bin/ruff format --check storage pacs dicomweb tests bench

typecheck: install-test
	$(VENV)/bin/mypy

pytest: install-test services
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

bench: install-test debs-bench services
	$(PY) -m bench.ingest $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
