# The two commands of the README. Both create .venv on first use.
VENV ?= .venv
PYTEST_ARGS ?=
# pytest-xdist workers: one a core (`auto`), at most 8 (each holds its own torch and models);
# PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= auto

.PHONY: demo test gpu-suite clean

demo:  ## install into .venv and run the main job: a real question answered with a paged KV cache
	bash .ci/install demo
	$(VENV)/bin/pagedllm demo
	$(VENV)/bin/pagedllm ask

test:  ## install with test dependencies into .venv and run the full test suite
	bash .ci/install dev
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --maxprocesses 8 --dist worksteal $(PYTEST_ARGS)

gpu-suite:  ## on a CUDA machine: the GPU tests and benchmarks, results under benchmarks/results/
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf build *.egg-info pagedtensor/_diskio*.so .pytest_cache .hypothesis
