# The README's two commands: `make demo` (the quickstart simulation) and `make test` (the test suite).
# Each sets itself up on a fresh machine: a virtual environment, torch, the package, the data.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel (it lies on disk on our machines); set TORCH_SPEC=torch for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FORTUNES_DIR := /usr/share/games/fortunes
APT_PACKAGES := dataset-fashion-mnist fortunes

export FLWR_TELEMETRY_ENABLED := 0
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test lint setup data clean

demo: setup data
	$(VENV)/bin/fedalign run configs/quickstart.yaml

test: setup data
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (pinned in the test extra): lint and formatting, as CI runs them.
lint: setup
	$(VENV)/bin/ruff check fedalign tests simulations
	$(VENV)/bin/ruff format --check fedalign tests simulations

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# Debian's packages for Fashion-MNIST and the fortunes corpus, when apt is usable and they are
# absent. Elsewhere fedalign looks in FEDALIGN_DATA_DIR / ~/.cache and downloads where it can.
data:
	@if [ -d $(FMNIST_DIR) ] && [ -d $(FORTUNES_DIR) ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  ($$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null 2>&1 || \
	   ($$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null)) \
	  || echo "warning: could not install $(APT_PACKAGES); see README (data)"; \
	else echo "apt-get not found: see README (data) for where fedalign looks for Fashion-MNIST"; fi

clean:
	rm -rf $(VENV) runs .pytest_cache
