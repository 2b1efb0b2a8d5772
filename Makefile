# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PYTRITON_SPEC ?= nvidia-pytriton==0.7.0
STUB_NUMPY ?= numpy==1.26.4
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo serve test lint train evaluate clean

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml changes. A torch that already imports in the
# environment (e.g. a CUDA build seen through VENV_FLAGS=--system-site-packages) is kept.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded Triton server (tritonserver 2.51 + python backend) from the nvidia-pytriton wheel;
	# --no-deps: its Python API (which pins numpy<2) is never imported
	$(PY) -m pip install -q --no-deps "$(PYTRITON_SPEC)"
	# numpy 1.x for the python-backend stubs only (built against the numpy 1 C API; see export/serve.py)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton-site "$(STUB_NUMPY)"
	touch $(STAMP)

demo: setup
	$(PY) export/build_engines.py --checkpoint checkpoints/duplus_demo.pt --output model_repository
	$(PY) -m training.demo --checkpoint checkpoints/duplus_demo.pt --out demo_out --serve model_repository

serve: setup
	$(PY) -m export.serve --model-repository model_repository --checkpoint checkpoints/duplus_demo.pt

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check training export clients perf tests

train: setup
	$(PY) -m training.train_segmentation --config configs/demo.yaml

evaluate: setup
	$(PY) -m training.evaluate --checkpoint checkpoints/duplus_demo.pt --modality CT --cases 4 --seed 9001

clean:
	rm -rf demo_out .pytest_cache
