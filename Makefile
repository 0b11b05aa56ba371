# The README's two commands: `make demo` (the quickstart simulation) and `make test` (the test suite).
# Each sets itself up on a fresh machine: a virtual environment, torch, the package, the data.
# Needs Python >= 3.11 with its venv module (Debian: apt-get install python3-venv).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch's build. TORCH=cpu (the default) installs it from PyTorch's CPU index: on Linux, PyPI's
# torch is the CUDA build and pulls gigabytes of NVIDIA wheels. Where that index cannot be reached,
# pip falls back to its other sources (our machines keep the CPU wheel in pip's find-links).
# TORCH=cuda installs PyPI's build (CUDA on Linux). TORCH_SPEC picks the version.
TORCH ?= cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_cpu := --index-url https://download.pytorch.org/whl/cpu --retries 0
TORCH_INDEX_cuda :=
# The setup stamp is named after the build and the spec: changing either reinstalls torch.
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)-$(TORCH_SPEC)' | tr -c 'A-Za-z0-9.-' '_')
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FORTUNES_DIR := /usr/share/games/fortunes
APT_PACKAGES := dataset-fashion-mnist fortunes
# `flwr run .`'s home (see the README): apps, and the local SuperLink's state and log
FLWR_HOME ?= $(CURDIR)/.flwr_home

export FLWR_TELEMETRY_ENABLED := 0
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test lint setup data clean superlink-stop

demo: setup data
	$(VENV)/bin/fedalign run configs/quickstart.yaml

test: setup data
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (pinned in the test extra): lint and formatting, as CI runs them.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

setup: $(STAMP)

$(STAMP): pyproject.toml
	@case "$(TORCH)" in cpu|cuda) ;; *) echo "TORCH=$(TORCH): choose cpu or cuda"; exit 2;; esac
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "fedalign needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1) (set PYTHON=python3.11)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# a torch of the other build is replaced (pip would keep 2.13.0+cpu for TORCH=cuda's
	@# torch==2.13.0, as it satisfies the spec); the CPU index's builds are the "+cpu" versions
	if $(PY) -c 'import importlib.metadata as m, sys; v = m.version("torch"); \
	    sys.exit(("+cpu" in v) == ("$(TORCH)" == "cpu"))' 2>/dev/null; then \
	  $(PY) -m pip uninstall --quiet --yes torch; fi
	rm -f $(VENV)/.installed*
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX_$(TORCH))
	$(PY) -m pip install --quiet -e ".[test,hf]"
	touch $@

# Debian's packages for Fashion-MNIST and the fortunes corpus, when apt is usable and they are
# absent. Elsewhere see the README, section "Datasets", for where fedalign looks for data.
data:
	@if [ -d $(FMNIST_DIR) ] && [ -d $(FORTUNES_DIR) ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  ($$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null 2>&1 || \
	   ($$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null)) \
	  || echo "warning: could not install $(APT_PACKAGES); see the README, section \"Datasets\""; \
	else echo "apt-get not found: see the README, section \"Datasets\", for where fedalign looks for data"; fi

# Stop the local SuperLink that `flwr run .` started for this FLWR_HOME, and no other: it is the
# one whose log file is in $(FLWR_HOME)/local-superlink/ ([s]: the pattern does not match the
# shell that runs it).
superlink-stop:
	@pids=$$(pgrep -f -- "flower-superlink .*--log-file $(FLWR_HOME)/local-superlink/[s]uperlink.log"); \
	if [ -z "$$pids" ]; then echo "no SuperLink of $(FLWR_HOME) is running"; \
	else kill $$pids && echo "stopped the SuperLink of $(FLWR_HOME) (pid $$pids)"; fi

clean:
	rm -rf $(VENV) runs .pytest_cache
