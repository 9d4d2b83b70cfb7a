#!/bin/bash
# The GPU tier in one command, for a CUDA machine without internet and a short time window: installs carried
# wheels, builds megamod._C with its CUDA kernels, then runs the GPU tests and benchmarks in order of value, each
# under its own timeout, going on past a failed step, and appends a dated section to docs/PERF.md.
#
#   tools/gpu_check.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--skip STEP,...] [--no-append] [--dry-run]
#   MEGAMOD_WHEELS=.whl make gpu-check              # the same through make
#
# --out DIR (else $GPU_CHECK_OUT, else $OUT when the caller sets it, else runs/gpu-check/<time>): everything the
#   run writes goes there: gpu_check.log (all output), steps.json (each step: status, seconds, exit code), one JSON
#   per benchmark, and PERF.md (docs/PERF.md with the new section), at most 8 files in all.
# --wheels DIR: every wheel in DIR is installed offline first (pip --no-index --no-deps), e.g. megatron-core:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#         -d .whl megatron-core==0.16.1
# --budget SECONDS: the whole run's time; a step's timeout is cut to what is left, keeping 40 s for the report.
# --skip STEP,...: leave these steps out (a rerun of what an earlier window did not finish), e.g. attention
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). Exits non-zero if any step
# failed; the figures of the others are still recorded.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
WHEELS=${MEGAMOD_WHEELS:-}
OUT=${GPU_CHECK_OUT:-${OUT:-runs/gpu-check/$(date +%Y%m%d-%H%M%S)}}
BUDGET=${GPU_CHECK_BUDGET:-0}
SKIP=
APPEND=1
DRY_RUN=${DRY_RUN:-}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
        --skip) SKIP=",${2:?--skip needs step names},"; shift 2 ;;
        --no-append) APPEND=; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget $BUDGET is not a number of seconds" >&2; exit 2; }
if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then
    echo "gpu_check: wheel directory $WHEELS does not exist" >&2; exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # megamod from this checkout, with the extension built in place
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}  # TORCH_CUDA_ARCH_LIST unset: the visible GPUs' arch
START=$SECONDS
FAILED=()
STEPS=()
REPORT_RESERVE=40

if [[ -z "$DRY_RUN" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
echo "gpu_check: output directory $OUT${DRY_RUN:+ (dry run: nothing is run or written)}"

STEP_LOG="${TMPDIR:-/tmp}/gpu_check_step.$$.log"
SUMMARY=()
TEST_NOTES=()

record() {  # record NAME STATUS SECONDS EXIT NOTE: one entry of steps.json, which is rewritten after every step
    STEPS+=("{\"step\": \"$1\", \"status\": \"$2\", \"seconds\": $3, \"exit\": $4, \"last_line\": \"$5\"}")
    SUMMARY+=("$1 $2 ($3 s)")
    [[ -n "$DRY_RUN" ]] && return 0
    local i
    { echo "["
      for i in "${!STEPS[@]}"; do echo "  ${STEPS[$i]}$([[ $i -lt $((${#STEPS[@]} - 1)) ]] && echo ,)"; done
      echo "]"; } > "$OUT/steps.json"
}

step() {  # step NAME TIMEOUT COMMAND...: run it under its timeout (cut to the budget), record the outcome
    local name=$1 limit=$2; shift 2
    if [[ "$SKIP" == *",$name,"* ]]; then
        echo "== [$((SECONDS - START))s] $name skipped (--skip)"; record "$name" skipped 0 -1 "--skip"; return 0
    fi
    if [[ "$BUDGET" -gt 0 && "$name" != report ]]; then
        local left=$((BUDGET - (SECONDS - START) - REPORT_RESERVE))
        [[ $left -lt $limit ]] && limit=$left
    fi
    echo "== [$((SECONDS - START))s] $name (timeout ${limit}s): $*"
    [[ -n "$DRY_RUN" ]] && return 0
    if [[ $limit -le 0 ]]; then
        echo "!! $name skipped: the budget is spent"; record "$name" skipped 0 -1 "budget spent"; FAILED+=("$name")
        return 1
    fi
    local begin=$SECONDS rc status=ok last
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$STEP_LOG"
    rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && status=failed
    [[ $rc -eq 124 || $rc -eq 137 ]] && status=timeout
    # the step's last line (pytest's summary, a benchmark's last note, an error) for steps.json, JSON-safe
    local pattern='[^[:space:]]'
    [[ "$name" == *tests ]] && pattern='[0-9]+ (passed|failed|error|skipped)'  # pytest's summary, not a late warning
    last=$(grep -E "$pattern" "$STEP_LOG" | tail -n 1 | tr -d '"\\=' | tr -c '[:print:]' ' ' | sed 's/^ *//; s/ *$//' \
        | cut -c1-300)
    record "$name" "$status" $((SECONDS - begin)) "$rc" "$last"
    [[ "$name" == *tests ]] && TEST_NOTES+=("$name: $last")
    if [[ $rc -ne 0 ]]; then
        echo "!! $name $status (exit $rc)"; FAILED+=("$name"); return 1
    fi
}

skip() {  # skip NAME REASON
    echo "== [$((SECONDS - START))s] $1 skipped: $2"
    record "$1" skipped 0 -1 "$2"
    FAILED+=("$1")
}

pytest_step() {  # pytest_step NAME TIMEOUT FILES...
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" "$PYTHON" -m pytest "$@" -q -rs -p no:cacheprovider
}

bench() {  # bench NAME TIMEOUT [ARGS...]: tools/bench/NAME.py on cuda, its JSON in $OUT
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" "$PYTHON" tools/bench/$name.py --device cuda --json "$OUT/$name.json" "$@"
}

# ---- set-up: nothing runs without CUDA and megatron-core ----
step preflight 60 "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
'torch ' + torch.__version__ + ' sees no CUDA device: run on a GPU machine, PYTHON=<python with CUDA torch>')" \
    || exit 1
if [[ -n "$WHEELS" ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    [[ ${#wheels[@]} -gt 0 || -n "$DRY_RUN" ]] || { echo "gpu_check: no .whl files in $WHEELS" >&2; exit 2; }
    step wheels 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir "${wheels[@]:-$WHEELS/*.whl}" \
        || exit 1
fi
step imports 60 "$PYTHON" -c "
import importlib.util, sys
missing = [m for m in ('megatron.core', 'yaml', 'tokenizers', 'PIL', 'tqdm', 'numpy', 'pytest', 'setuptools')
           if importlib.util.find_spec(m.split('.')[0]) is None or importlib.util.find_spec(m) is None]
sys.exit('missing packages: ' + ', '.join(missing) + ' (carry their wheels: --wheels DIR)' if missing else 0)" \
    || exit 1
EXT=1
step build 240 "$PYTHON" setup.py -q build_ext --inplace || EXT=
[[ -n "$EXT" ]] && { step extension 60 "$PYTHON" -c "import sys, torch, megamod._C as c; sys.exit(0 if c.with_cuda else
'megamod._C was built without CUDA kernels: is nvcc on PATH (CUDA_HOME)?')" || EXT=; }

# ---- in order of value; a failed step does not stop the next ----
bench device 90
if [[ -n "$EXT" ]]; then
    pytest_step permute_tests 180 tests/gpu/test_permute_cuda.py
    bench permute 180
else
    skip permute_tests "megamod._C with CUDA kernels did not build or import"
    skip permute "megamod._C with CUDA kernels did not build or import"
fi
bench distill_step 360 --performance both
bench moe_layer 150
pytest_step gpu_tests 240 tests/gpu/test_moe_gpu.py tests/gpu/test_step_gpu.py
bench attention 120

# ---- the report: every JSON that was written, docs/PERF.md copied beside them ----
JSONS=()
for name in device permute distill_step moe_layer attention; do
    [[ -f "$OUT/$name.json" || -n "$DRY_RUN" ]] && JSONS+=("$OUT/$name.json")
done
NOTES=(--note "steps: $(IFS=';'; echo "${SUMMARY[*]}" | sed 's/;/; /g')")
for note in "${TEST_NOTES[@]}"; do NOTES+=(--note "$note"); done
REPORT=("$PYTHON" tools/bench/perf_report.py --command "tools/gpu_check.sh --budget $BUDGET" "${NOTES[@]}")
[[ -n "$APPEND" ]] && REPORT+=(--append docs/PERF.md)
if [[ ${#JSONS[@]} -gt 0 ]]; then
    step report 60 "${REPORT[@]}" "${JSONS[@]}"
    [[ -z "$DRY_RUN" ]] && cp docs/PERF.md "$OUT/PERF.md"
else
    skip report "no benchmark wrote its JSON"
fi
echo "== [$((SECONDS - START))s] ${DRY_RUN:+(dry run) }done; results in $OUT"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "!! failed or skipped: ${FAILED[*]}"
    exit 1
fi
