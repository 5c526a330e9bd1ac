# Two set-up commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv when missing. torch/torchvision are pinned here, for CPU machines like the
# CI runner, and nowhere else: setup.cfg keeps ranges that a cluster's own CUDA build satisfies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.zsadx-installed
TEST_STAMP := $(VENV)/.zsadx-test-installed

.PHONY: demo test venv clean browser bench-data bench-metrics bench-shard bench-pipeline bench-gpu

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q $(TORCH_PIN) -e .
	touch $(STAMP)

# The tests also need the test tools and DeepSpeed (ZeRO tests run on CPU).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q $(TORCH_PIN) -e '.[test,deepspeed]'
	touch $(TEST_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zsadx demo

# `make test` starts a single-node SLURM on this machine for the grid's end-to-end test (apt
# packages, root needed) and stops it afterwards by PID; `make test SLURM=0` leaves SLURM alone
# (its test then skips, saying why).
SLURM ?= 1
test: $(TEST_STAMP) browser
ifeq ($(SLURM),1)
	bash slurm/up.sh
	$(PY) -m pytest -q --durations=12 tests; rc=$$?; bash slurm/down.sh; exit $$rc
else
	$(PY) -m pytest -q --durations=12 tests
endif

# `zsadx report`'s tests load the page in a real headless Chromium (Debian's package). Without root
# or a mirror the install fails and those tests skip, saying why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@command -v chromium >/dev/null || ( $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null ) \
	  || echo "[browser] could not install chromium: the report's browser tests will skip"

clean:
	rm -rf runs .pytest_cache

# Benchmarks (figures, not tests). The metrics benchmark compares with anomalib's AUPRO, which
# lives in its own environment: it is never a zsadx dependency.
ANOMALIB_VENV := benchmarks/.venv-anomalib

bench-data: $(STAMP)
	$(PY) benchmarks/data.py

ADEVAL_VENV := benchmarks/.venv-adeval

# ADEval's EvalAccumulator needs numpy and cv2 only: --no-deps keeps a CUDA torch out of its venv.
bench-metrics: $(STAMP)
	test -x $(ANOMALIB_VENV)/bin/python || ($(PYTHON) -m venv $(ANOMALIB_VENV) && \
	  $(ANOMALIB_VENV)/bin/pip install -q $(TORCH_PIN) && \
	  $(ANOMALIB_VENV)/bin/pip install -q $(TORCH_PIN) anomalib scikit-learn scipy)
	test -x $(ADEVAL_VENV)/bin/python || ($(PYTHON) -m venv $(ADEVAL_VENV) && \
	  $(ADEVAL_VENV)/bin/pip install -q numpy opencv-python-headless && \
	  $(ADEVAL_VENV)/bin/pip install -q --no-deps adeval==1.1.0)
	$(PY) benchmarks/metrics.py --adeval-python $(ADEVAL_VENV)/bin/python \
	  --anomalib-python $(ANOMALIB_VENV)/bin/python

bench-shard: $(STAMP)
	$(PY) benchmarks/shard.py

bench-pipeline: $(STAMP)
	$(PY) benchmarks/eval_pipeline.py

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py
