#!/usr/bin/env bash
# One GPU check, in under 10 minutes on one GPU (issue 20, item 6):
#   1. pytest -m cuda tests/test_cuda.py   (engines, consuming mode, optimizer, meter vs predictor)
#   2. Table 1 at 512^2: conventional, fused, memcnn, iunets 0.1; delta = 5 and 30; 3 repeats
#   3. the 3D volume search (bench volume3d --device cuda) within a budget sized to fit the time
# CSVs go under data/results/ (or --out DIR), plus gpu_check-<stamp>-summary.txt.
#
# The GPU machines have no network and no `make setup`: their own python3 has a CUDA torch
# (2.11), pytest, hypothesis and scikit-image. The package runs from the source tree
# (PYTHONPATH=.). Only small pure-Python wheels are installed, from .whl/ (git-ignored; it
# travels with the tree). Download them on a machine with network beforehand:
#   pip download --no-deps memcnn==1.5.2 iunets==0.1 tqdm==4.70.1 -d .whl
#
# Usage: bash benchmarks/gpu_check.sh [--out DIR] [--cpu-smoke]
#   --cpu-smoke  every part except CUDA, at tiny sizes on the CPU (CI): --out is required
#                and the CUDA tests are collected and skipped.
# Environment: PYTHON (default python3).
#
# Time budget on one H100, each phase capped with `timeout` so that the whole run stays
# under 10 min even if an estimate is wrong (the CSVs are written after every
# configuration/step, so a capped phase keeps what it measured):
#   tests    <= 150 s (estimate ~90 s: 16 tests, float64 property examples of small models)
#   table1   <= 300 s (estimate ~200 s: 8 configurations in fresh processes, each ~10 s start-up
#                      and CUDA init, ~10-20 s building the 32M/189M-parameter model on the CPU,
#                      1 measured + 3 timed steps of ~0.1-2 s; plus ~30 s for iunets'
#                      parameter check)
#   volume3d <= 120 s (estimate ~80 s: 5 modes x 2-4 points in fresh processes of ~5-10 s;
#                      a 2 GiB budget keeps D moderate, so steps take well under a second)
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
OUT=""
SMOKE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || { echo "gpu_check: --out needs a directory" >&2; exit 2; }
               OUT="$2"; shift 2 ;;
        --cpu-smoke) SMOKE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (use --out DIR, --cpu-smoke)" >&2; exit 2 ;;
    esac
done
if [[ $SMOKE -eq 1 && -z "$OUT" ]]; then
    echo "gpu_check: --cpu-smoke writes to a temporary directory: give it with --out DIR" >&2
    exit 2
fi
OUT="${OUT:-data/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STAMP="$(date +%Y%m%d-%H%M%S)"
SUMMARY="$OUT/gpu_check-$STAMP-summary.txt"

command -v "$PYTHON" >/dev/null || { echo "gpu_check: no '$PYTHON' on PATH: set PYTHON=/path/to/python" >&2; exit 2; }

# --- the small wheels (memcnn, iunets, tqdm), installed into a private target directory
SITE="${GPU_CHECK_SITE:-/tmp/site}"
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" --upgrade .whl/*.whl
    else  # a pure-Python wheel is a zip of importable files
        echo "gpu_check: no pip for $PYTHON: unpacking .whl/*.whl into $SITE"
        for whl in .whl/*.whl; do "$PYTHON" -m zipfile -e "$whl" "$SITE"; done
    fi
else
    echo "gpu_check: no .whl/ folder: memcnn and iunets are used only if already importable."
    echo "  Before the run, on a machine with network, in the repository root:"
    echo "    pip download --no-deps memcnn==1.5.2 iunets==0.1 tqdm==4.70.1 -d .whl"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

have() { "$PYTHON" -c "$1" >/dev/null 2>&1; }
have "import torch, numpy, tqdm" || {
    echo "gpu_check: this python lacks torch, numpy or tqdm. tqdm is a small wheel:" >&2
    echo "  pip download --no-deps tqdm==4.70.1 -d .whl   (then run again)" >&2
    exit 2
}
have "import pytest, hypothesis" || { echo "gpu_check: this python lacks pytest or hypothesis" >&2; exit 2; }
MEMCNN=0; IUNETS=0
have "from iunet_nb.engine.memcnn import import_memcnn; import_memcnn()" && MEMCNN=1
have "from iunet_nb.measure.bench import iunets_available as a; assert a()" && IUNETS=1

if [[ $SMOKE -eq 1 ]]; then
    DEVICE=cpu; SIZES=(32); DELTAS=(1); REPEATS=1; BUDGET=0.02
    MODES=(conventional fused); VMODES=(unet fused)
    [[ $MEMCNN -eq 1 ]] && MODES+=(memcnn)   # iunets' parameter check builds 189M parameters: not here
    T_TESTS=300; T_TABLE=300; T_VOLUME=300
else
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check: torch.cuda.is_available() is False for $PYTHON: run on a GPU machine" \
             "(or use --cpu-smoke for the CPU-side parts)" >&2
        exit 2
    }
    DEVICE=cuda; SIZES=(512); DELTAS=(5 30); REPEATS=3; BUDGET=2
    MODES=(conventional fused); VMODES=(unet fused fused_consuming)
    [[ $MEMCNN -eq 1 ]] && { MODES+=(memcnn); VMODES+=(memcnn); }
    [[ $IUNETS -eq 1 ]] && { MODES+=(iunets); VMODES+=(iunets); }
    T_TESTS=150; T_TABLE=300; T_VOLUME=120
fi
[[ $IUNETS -eq 1 ]] || echo "gpu_check: iunets 0.1 not importable: measuring without the iunets mode"

FAILED=()
phase() {  # phase NAME SECONDS LOG COMMAND...: run capped, log to LOG and stdout, record failures
    local name="$1" limit="$2" log="$3"; shift 3
    local start=$SECONDS rc=0
    echo "== $name (at most ${limit} s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    [[ $rc -eq 0 ]] || FAILED+=("$name (exit $rc$([[ $rc -eq 124 || $rc -eq 130 ]] && echo ', time cap'))")
}

{
    echo "gpu_check $STAMP ($([[ $SMOKE -eq 1 ]] && echo cpu-smoke || echo gpu))"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    echo "memcnn importable: $MEMCNN, iunets importable: $IUNETS"
} | tee "$SUMMARY"

phase tests "$T_TESTS" "$OUT/gpu_check-$STAMP-tests.log" \
    "$PYTHON" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py
phase table1 "$T_TABLE" "$OUT/gpu_check-$STAMP-table1.log" \
    "$PYTHON" -m iunet_nb.bench table1 --device "$DEVICE" --size "${SIZES[@]}" --deltas "${DELTAS[@]}" \
    --modes "${MODES[@]}" --repeats "$REPEATS" --out "$OUT" --no-progress --no-plot
phase volume3d "$T_VOLUME" "$OUT/gpu_check-$STAMP-volume3d.log" \
    "$PYTHON" -m iunet_nb.bench volume3d --device "$DEVICE" --budget-gib "$BUDGET" \
    --modes "${VMODES[@]}" --out "$OUT" --no-progress --no-plot

{
    echo
    echo "tests: $(grep -E '(passed|failed|skipped|error)' "$OUT/gpu_check-$STAMP-tests.log" | tail -1)"
    echo "table1 CSV: $(ls -t "$OUT"/table1-2*.csv 2>/dev/null | head -1)"
    echo "volume3d CSV: $(ls -t "$OUT"/volume3d-2*[0-9].csv 2>/dev/null | head -1)"
    echo "total: $SECONDS s"
    if [[ ${#FAILED[@]} -gt 0 ]]; then echo "FAILED: ${FAILED[*]}"; else echo "all phases passed"; fi
} | tee -a "$SUMMARY"
[[ ${#FAILED[@]} -eq 0 ]]
