# vnpacs: `make run` serves the embedded default; `make test` installs test needs, starts services, runs everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEBS_TEST := dcmtk chromium fonts-dejavu-core poppler-utils
DEBS_BENCH := dcmtk orthanc orthanc-dicomweb

.PHONY: install install-test run test lint typecheck pytest services debs-test debs-bench bench clean viewer

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test debs-test viewer

run: install viewer
	$(VENV)/bin/vnpacs serve

# The OHIF viewer: its pinned prebuilt dist from the npm registry, unpacked into viewer_api/dist (never committed).
OHIF_VERSION := 3.13.2
viewer: viewer_api/dist/.ohif-$(OHIF_VERSION)

viewer_api/dist/.ohif-$(OHIF_VERSION):
	@if ! command -v npm >/dev/null; then echo "npm not found: the viewer is skipped (everything else runs)"; exit 0; fi; \
	set -e; mkdir -p .cache/ohif; cd .cache/ohif; \
	[ -f ohif-app-$(OHIF_VERSION).tgz ] || npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null; \
	rm -rf package && tar xzf ohif-app-$(OHIF_VERSION).tgz; cd ../..; \
	rm -rf viewer_api/dist && mv .cache/ohif/package/dist viewer_api/dist && touch $@

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
	$(VENV)/bin/ruff check storage pacs dicomweb viewer_api worklist tests bench
	$(VENV)/bin/ruff format --check storage pacs dicomweb viewer_api worklist tests bench

typecheck: install-test
	$(VENV)/bin/mypy

pytest: install-test services
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

bench: install-test debs-bench services
	$(PY) -m bench.ingest $(BENCH_ARGS)
	$(PY) -m bench.dicomweb

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
