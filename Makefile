# The two commands a user needs: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.megamod-installed

# The second test environment: megatron-core 0.19 (it needs Python 3.12) beside .venv's 0.16.1. PY312 is python3.12
# on PATH, else pyenv's newest 3.12.x (these machines have pyenv, whose shim needs PYENV_VERSION).
PY312 ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	ls -d "$$(pyenv root 2>/dev/null)"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -1)
VENV312 := .venv312
VPY312 := $(VENV312)/bin/python
STAMP312 := $(VENV312)/.megamod-installed

.PHONY: setup setup312 test test016 test019 demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-common.txt requirements-compat.txt setup.py \
		$(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps --upgrade --target $(VENV)/compat-tf4 -r requirements-compat.txt
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# On Python 3.12 PyPI has torch only as its CUDA build (about 5 GB with its nvidia-* wheels); it runs on CPU as is.
# MEGAMOD_NO_CUDA: this environment only tests the CPU path, so megamod._C is built without its CUDA kernels even
# where nvcc is found (tests/unit/test_cuda_compile.py compiles them on its own).
setup312: $(STAMP312)

$(STAMP312): requirements-mcore019.txt requirements-common.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@test -n "$(PY312)" || { echo "make test needs Python 3.12 for its megatron-core 0.19 environment: install it" \
		"or pass PY312=/path/to/python3.12" >&2; exit 1; }
	test -x $(VPY312) || $(PY312) -m venv $(VENV312)
	$(VPY312) -m pip install -q -r requirements-mcore019.txt
	MEGAMOD_NO_CUDA=1 $(VPY312) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP312)

# Both supported megatron-core series; both run even when the first fails, and make fails if either did.
test: setup setup312
	@rc=0; $(MAKE) --no-print-directory test016 || rc=1; $(MAKE) --no-print-directory test019 || rc=1; exit $$rc

test016: setup
	$(VPY) -m pytest tests -q

# What runs on megatron-core 0.19: the tests that reach megatron-core. Those that do not (data formats, indexing and
# preprocessing, tokenizers and templates, the benchmark and GPU-tier scripts, the CUDA compile check, the HF 4.57
# export check) and two that reach it only through code the rest already runs on 0.19 (tests/slurm: sbatch and srun
# plumbing around the trainer; the demo: the stages end to end) run once, on 0.16, so that make test stays near
# 20 minutes on 2 cores. `make test019 TESTS_019=tests` runs everything on 0.19.
ONCE := tests/slurm tests/unit/test_demo.py tests/unit/test_cuda_compile.py tests/unit/test_hf_compat.py \
	tests/unit/test_bench_report.py tests/unit/test_gpu_check.py tests/unit/test_examples.py \
	tests/unit/test_data_check_data.py tests/unit/test_data_images.py tests/unit/test_data_indexed.py \
	tests/unit/test_data_records.py tests/unit/test_data_startup.py tests/unit/test_data_synthetic.py \
	tests/unit/test_data_templates.py tests/unit/test_data_tokenizer.py tests/unit/test_data_sampler.py \
	tests/distributed/test_indexed_train_dp.py
TESTS_019 ?= tests $(addprefix --ignore=,$(ONCE))
test019: setup312
	$(VPY312) -m pytest $(TESTS_019) -q

demo: setup
	$(VPY) -m megamod demo --out runs/demo

# CPU benchmarks at CPU sizes (about 5 minutes; loss_memory's S=4096 reference row needs ~21 GB free, else it is
# skipped, saying so): tables on stdout, JSON in $(BENCH_OUT). To record them:
#   .venv/bin/python tools/bench/perf_report.py $(BENCH_OUT)/*.json --append docs/PERF.md
BENCH_OUT ?= runs/bench
bench: setup
	$(VPY) tools/bench/permute.py --device cpu --shapes 16384x1024x8x2 4096x4096x8x2 16384x1024x4x2 \
		--repeats 10 --json $(BENCH_OUT)/permute.json
	$(VPY) tools/bench/moe_layer.py --device cpu --repeats 10 --json $(BENCH_OUT)/moe_layer.json
	$(VPY) tools/bench/distill_step.py --device cpu --preset cpu --json $(BENCH_OUT)/distill_step.json
	$(VPY) tools/bench/attention.py --device cpu --json $(BENCH_OUT)/attention.json
	$(VPY) tools/bench/loss_memory.py --device cpu --seqs 1024 4096 --chunks 256 --json $(BENCH_OUT)/loss_memory.json

# The GPU tier on a CUDA machine without internet (tools/gpu_check.sh): MEGAMOD_WHEELS=DIR carries megatron-core.
gpu-check:
	tools/gpu_check.sh

clean:
	rm -rf build megamod/_C*.so runs
