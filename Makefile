# Two commands do all setup from a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# setuptools' notice on every editable install ("be careful with folders ... same name as your package")
PIP := PYTHONWARNINGS="ignore:Editable installation" $(PYTHON) -m pip install --quiet -c constraints.txt
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL = { $(SUDO) apt-get install -y -qq $(1) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(1); }; }

.PHONY: demo test bench browser wrk

$(STAMP): pyproject.toml constraints.txt  ## the package and what it runs on (about 7 GB, 4 GB of it torch's CUDA libraries)
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PIP) -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)  ## and what the tests use (pytest, moto, selenium, ...): not installed for the demo
	$(PIP) -e ".[test]"
	touch $(TEST_STAMP)

demo: $(STAMP)  ## extract SRT features of the bundled photos on a local Ray instance (CPU), then picture them
	$(PYTHON) jobs/extract.py --dataset data/samples --out out/samples.zarr
	$(PYTHON) jobs/visualize.py --store out/samples.zarr --out out/samples.png

browser:  ## Chromium and ChromeDriver for srt-serve's browser test (Debian's packages, installed once)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || $(call APT_INSTALL,chromium chromium-driver)

wrk:  ## the HTTP load generator of bench_serve (Debian's package, installed once)
	@command -v wrk >/dev/null || $(call APT_INSTALL,wrk)

test: $(TEST_STAMP) browser  ## the whole test suite (CI runs exactly this)
	$(PYTHON) -m pytest

bench: $(TEST_STAMP) wrk  ## every benchmark; each rewrites its section of bench/RESULTS.md
	$(PYTHON) -m bench.bench_srt
	$(PYTHON) -m bench.bench_store
	$(PYTHON) -m bench.bench_dataplane
	$(PYTHON) -m bench.bench_dataplane --beside-a-gpu
	$(PYTHON) -m bench.bench_driver
	$(PYTHON) -m bench.bench_ray
	$(PYTHON) -m bench.bench_retrieval
	$(PYTHON) -m bench.bench_serve
	$(PYTHON) -m bench.quality
	$(PYTHON) -m bench.bench_segmentation
	$(PYTHON) -m bench.bench_distill
	$(PYTHON) -m bench.bench_probes
