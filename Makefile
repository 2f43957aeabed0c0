# The two commands of the README. Both create .venv on first use.
VENV ?= .venv
PYTEST_ARGS ?=
# pytest-xdist workers: one a core (`auto`), at most 8 (each holds its own torch and models);
# PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= auto

.PHONY: demo test test-torch-latest gpu-suite clean

demo:  ## install into .venv and run the main job: a real question answered with a paged KV cache
	bash .ci/install demo
	$(VENV)/bin/pagedllm demo
	$(VENV)/bin/pagedllm ask

test:  ## install with test dependencies into .venv and run the full test suite
	bash .ci/install dev
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --maxprocesses 8 --dist worksteal $(PYTEST_ARGS)

# The tests that lean on torch's internals (the __torch_dispatch__ subclass, torch.compile, the
# OpInfo and module sweeps, the row gathers and scatters, the list ops that torch.optim runs) again under the newest torch release, in
# their own venv: `make test` pins torch 2.13.0 on a CPU machine, while `pip install pagedllm` takes
# the newest (2.14 counted a returned view's offset twice under torch.compile; 2.15 runs
# `t[mask] = v` as masked_fill_). On a CPU machine this is PyPI's CUDA build, about 3 GB.
TORCH_LATEST ?= 2.15.0
TORCH_LATEST_TESTS ?= tests/test_tensor*.py tests/test_torch_*.py tests/test_row_*.py tests/test_gather*.py tests/test_list_ops*.py

test-torch-latest:  ## the torch-internals tests again under torch $(TORCH_LATEST), in .venv-torch-latest
	VENV=.venv-torch-latest TORCH=$(TORCH_LATEST) bash .ci/install dev
	.venv-torch-latest/bin/python -m pytest -q -n $(PYTEST_WORKERS) --maxprocesses 8 --dist worksteal $(TORCH_LATEST_TESTS)

gpu-suite:  ## on a CUDA machine: the GPU tests and benchmarks, results under benchmarks/results/
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf build *.egg-info pagedtensor/_diskio*.so .pytest_cache .hypothesis
