# ct-ai-node: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
DEBIAN_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-python chromium openssl postgresql poppler-utils
# The OHIF viewer test (tests/test_ohif_viewer.py): OHIF's prebuilt app (npm @ohif/app ships
# dist/) and playwright-core to drive Debian's chromium, into the gitignored .ohif/
OHIF_VERSION := 3.13.2
PLAYWRIGHT_CORE_VERSION := 1.65.2
OHIF_DIR := .ohif
OHIF_STAMP := $(OHIF_DIR)/.installed-$(OHIF_VERSION)-$(PLAYWRIGHT_CORE_VERSION)

.PHONY: install system-deps ohif-viewer demo test train train-lungs train-opacity train-ctnet train-lobes evaluate evaluate-real benchmark clean

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
	for tool in dciodvfy storescu pdftoppm pdftotext; do command -v $$tool >/dev/null || missing=yes; done; \
	command -v Orthanc >/dev/null || test -x /usr/sbin/Orthanc || missing=yes; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing=yes; \
	command -v chromium >/dev/null || missing=yes; \
	command -v openssl >/dev/null || missing=yes; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=yes; \
	test -e /usr/share/orthanc/plugins/libOrthancPython.so || missing=yes; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEBIAN_PACKAGES); \
	  else echo "apt-get not found: install $(DEBIAN_PACKAGES) by hand"; fi; \
	fi
	@# node and npm for the OHIF viewer test, unless the machine already has them
	@if ! command -v node >/dev/null || ! command -v npm >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm; \
	  else echo "apt-get not found: install node and npm by hand"; fi; \
	fi

$(OHIF_STAMP):
	rm -rf $(OHIF_DIR) && mkdir -p $(OHIF_DIR)
	echo '{"private": true}' > $(OHIF_DIR)/package.json
	cd $(OHIF_DIR) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
	  && tar xzf ohif-app-$(OHIF_VERSION).tgz && mv package app && rm ohif-app-$(OHIF_VERSION).tgz
	cd $(OHIF_DIR) && npm install --silent --no-audit --no-fund --no-package-lock playwright-core@$(PLAYWRIGHT_CORE_VERSION)
	touch $@

ohif-viewer: system-deps $(OHIF_STAMP)

demo: install
	$(VENV)/bin/ct-ai-node demo --workdir out/demo

test: install system-deps ohif-viewer
	$(PY) -m pytest -q -rs

train: install
	$(VENV)/bin/ct-ai-node train

# real chest CT (not in this repository) used as backgrounds and negatives; LIDC-IDRI-0001 is held out
REAL_DATA ?= ../shared/data/real
HOLD_OUT ?= lidc_idri_0001

# the lung U-Net fine-tuned on phantoms + real backgrounds with inserted lesions (docs/models.md);
# run before train-opacity, which sees this lung U-Net's lungs
train-lungs: install
	$(VENV)/bin/ct-ai-node train lungs --cases 60 --val-cases 12 --epochs 3 \
	    --backgrounds $(REAL_DATA) --hold-out $(HOLD_OUT)

# the opacity U-Net on phantoms + real backgrounds, then its three-class case model (docs/models.md)
train-opacity: install
	$(VENV)/bin/ct-ai-node train infection --cases 60 --val-cases 12 --epochs 6 --cache-dir out/cache \
	    --backgrounds $(REAL_DATA) --hold-out $(HOLD_OUT) --set lungs=predicted
	$(VENV)/bin/ct-ai-node calibrate pattern --cases 45 --backgrounds $(REAL_DATA) --hold-out $(HOLD_OUT) \
	    --out out/calibration

# method B on phantoms + real backgrounds, then its case decision (docs/models.md, issue 12 fifth pass)
train-ctnet: install
	$(VENV)/bin/ct-ai-node train ctnet --cases 60 --val-cases 16 --epochs 6 \
	    --backgrounds $(REAL_DATA) --hold-out $(HOLD_OUT)
	$(VENV)/bin/ct-ai-node calibrate ctnet --cases 60 --out out/calibration-ctnet

# the lobe U-Net on phantoms whose fissures the generator draws (no real lobe labels here;
# docs/models.md, issue 16), then its Dice and the CT severity score on held-out phantoms
train-lobes: install
	$(VENV)/bin/ct-ai-node train lobes --cases 60 --val-cases 12
	$(VENV)/bin/ct-ai-node evaluate --lobes --cases 20 --first-seed 90300 --out out/evaluation-lobes

evaluate: install
	$(VENV)/bin/ct-ai-node evaluate --out out/evaluation

evaluate-real: install
	$(VENV)/bin/ct-ai-node evaluate --real $(REAL_DATA) --hold-out $(HOLD_OUT) --out out/evaluation-real

benchmark: install
	$(PY) benchmarks/analyze.py

clean:
	rm -rf out .pytest_cache
