# ct-ai-node: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
DEBIAN_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-python

.PHONY: install system-deps demo test train evaluate benchmark clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# CPU torch: a bare `torch` would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Real DICOM peers and validators for the tests (Debian packages), when apt is there.
system-deps:
	@missing=""; \
	for tool in dciodvfy storescu; do command -v $$tool >/dev/null || missing=yes; done; \
	command -v Orthanc >/dev/null || test -x /usr/sbin/Orthanc || missing=yes; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing=yes; \
	test -e /usr/share/orthanc/plugins/libOrthancPython.so || missing=yes; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEBIAN_PACKAGES); \
	  else echo "apt-get not found: install $(DEBIAN_PACKAGES) by hand"; fi; \
	fi

demo: install
	$(VENV)/bin/ct-ai-node demo --workdir out/demo

test: install system-deps
	$(PY) -m pytest -q -rs

train: install
	$(VENV)/bin/ct-ai-node train

evaluate: install
	$(VENV)/bin/ct-ai-node evaluate --out out/evaluation

benchmark: install
	$(PY) benchmarks/analyze.py

clean:
	rm -rf out .pytest_cache
