# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint train evaluate clean

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml changes. A torch that already imports in the
# environment (e.g. a CUDA build seen through VENV_FLAGS=--system-site-packages) is kept.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) -m training.demo --checkpoint checkpoints/duplus_demo.pt --out demo_out

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check training tests

train: setup
	$(PY) -m training.train_segmentation --config configs/demo.yaml

evaluate: setup
	$(PY) -m training.evaluate --checkpoint checkpoints/duplus_demo.pt --modality CT --cases 4 --seed 9001

clean:
	rm -rf demo_out .pytest_cache
