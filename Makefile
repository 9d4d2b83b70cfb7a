# The two commands a user needs: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.megamod-installed

.PHONY: setup test demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-compat.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps --upgrade --target $(VENV)/compat-tf4 -r requirements-compat.txt
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: setup
	$(VPY) -m pytest tests -q

demo: setup
	$(VPY) -m megamod demo --out runs/demo

# CPU benchmarks at CPU sizes (about 2 minutes): tables on stdout, JSON in $(BENCH_OUT). To record them:
#   .venv/bin/python tools/bench/perf_report.py $(BENCH_OUT)/*.json --append docs/PERF.md
BENCH_OUT ?= runs/bench
bench: setup
	$(VPY) tools/bench/permute.py --device cpu --shapes 16384x1024x8x2 4096x4096x8x2 16384x1024x4x2 \
		--repeats 10 --json $(BENCH_OUT)/permute.json
	$(VPY) tools/bench/moe_layer.py --device cpu --repeats 10 --json $(BENCH_OUT)/moe_layer.json
	$(VPY) tools/bench/distill_step.py --device cpu --preset cpu --json $(BENCH_OUT)/distill_step.json
	$(VPY) tools/bench/attention.py --device cpu --json $(BENCH_OUT)/attention.json

# The GPU tier on a CUDA machine without internet (tools/gpu_check.sh): MEGAMOD_WHEELS=DIR carries megatron-core.
gpu-check:
	tools/gpu_check.sh

clean:
	rm -rf build megamod/_C*.so runs
