#!/bin/bash
# The GPU tier in one command, for a machine with CUDA and no internet (torch with CUDA installed; other packages
# carried as wheels): builds megamod._C with its CUDA kernels, runs tests/gpu, runs the benchmarks at GPU sizes,
# writes their JSON and appends a dated section (device, versions, command, figures) to docs/PERF.md.
#
#   tools/gpu_check.sh [--wheels DIR] [--out DIR] [--no-append] [--dry-run]
#   MEGAMOD_WHEELS=wheels/ make gpu-check        # the same through make
#   DRY_RUN=1 tools/gpu_check.sh                 # print the steps only
#
# --wheels DIR: every wheel in DIR is installed offline first (pip --no-index --no-deps), e.g. megatron-core and
# whatever of requirements.txt the machine lacks; fetch them elsewhere with
#   pip download --no-deps -d wheels/ megatron-core==0.16.1 pyyaml tokenizers pillow tqdm pytest ...
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). Takes about 5 minutes on one
# H100; exits non-zero if a step or a GPU test fails (the figures are still recorded).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
WHEELS=${MEGAMOD_WHEELS:-}
OUT=${GPU_CHECK_OUT:-runs/gpu-check/$(date +%Y%m%d-%H%M%S)}
APPEND=1
DRY_RUN=${DRY_RUN:-}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --no-append) APPEND=; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # megamod from this checkout, with the extension built in place
export MAX_JOBS=${MAX_JOBS:-8}
START=$SECONDS
FAILED=()

step() {  # step NAME COMMAND...: print it, run it unless dry, remember a failure
    local name=$1; shift
    echo "== [$((SECONDS - START))s] $name: $*"
    [[ -n "$DRY_RUN" ]] && return 0
    "$@" || { echo "!! $name failed (exit $?)" >&2; FAILED+=("$name"); return 1; }
}

step preflight "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
'torch ' + torch.__version__ + ' sees no CUDA device: run on a GPU machine, PYTHON=<python with CUDA torch>')" \
    || exit 1
if [[ -n "$WHEELS" ]]; then
    [[ -d "$WHEELS" ]] || { echo "gpu_check: wheel directory $WHEELS does not exist" >&2; exit 2; }
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    [[ ${#wheels[@]} -gt 0 ]] || { echo "gpu_check: no .whl files in $WHEELS" >&2; exit 2; }
    step wheels "$PYTHON" -m pip install --no-index --no-deps --find-links "$WHEELS" "${wheels[@]}" || exit 1
fi
step imports "$PYTHON" -c "
import importlib.util, sys
missing = [m for m in ('megatron.core', 'yaml', 'tokenizers', 'PIL', 'tqdm', 'numpy', 'pytest', 'setuptools')
           if importlib.util.find_spec(m.split('.')[0]) is None or importlib.util.find_spec(m) is None]
sys.exit('missing packages: ' + ', '.join(missing) + ' (carry their wheels: --wheels DIR)' if missing else 0)" \
    || exit 1
step build "$PYTHON" setup.py build_ext --inplace || exit 1
step extension "$PYTHON" -c "import sys, megamod._C as c; sys.exit(0 if c.with_cuda else
'megamod._C was built without CUDA kernels: is nvcc on PATH (CUDA_HOME)?')" || exit 1

[[ -n "$DRY_RUN" ]] || mkdir -p "$OUT"
PYTEST=("$PYTHON" -m pytest tests/gpu tests/unit/test_cuda_compile.py -q -rs -p no:cacheprovider)
gpu_tests() {  # pytest's output goes to the console and to pytest.log; its last line summarises the outcome
    "${PYTEST[@]}" 2>&1 | tee "$OUT/pytest.log"
    return "${PIPESTATUS[0]}"
}
step "tests (${PYTEST[*]})" gpu_tests
TESTS=$(tail -n 1 "$OUT/pytest.log" 2>/dev/null | tr -d '=' | sed 's/^ *//; s/ *$//')

JSONS=()
for bench in permute moe_layer distill_step attention; do
    step "$bench" "$PYTHON" tools/bench/$bench.py --device cuda --json "$OUT/$bench.json" && JSONS+=("$OUT/$bench.json")
done

REPORT=("$PYTHON" tools/bench/perf_report.py --command "tools/gpu_check.sh" --note "tests/gpu: ${TESTS:-not run}"
        --save-json "$OUT/results.json")
[[ -n "$APPEND" ]] && REPORT+=(--append docs/PERF.md)
if [[ -n "$DRY_RUN" ]]; then
    step report "${REPORT[@]}" "$OUT"/{permute,moe_layer,distill_step}.json
elif [[ ${#JSONS[@]} -gt 0 ]]; then
    step report "${REPORT[@]}" "${JSONS[@]}"
fi
SUMMARY="results in $OUT"
[[ -n "$APPEND" && -z "$DRY_RUN" ]] && SUMMARY+=", section appended to docs/PERF.md"
echo "== [$((SECONDS - START))s] ${DRY_RUN:+(dry run) }done; $SUMMARY"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "!! failed: ${FAILED[*]}" >&2
    exit 1
fi
