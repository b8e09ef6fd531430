#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU and no network (e.g. a lent H100/H200):
# GPU tests, then the CUDA benchmarks, everything written under $OUT (default ./gpu-results).
# Finishes in <= 8 minutes on an H100: each stage has its own time limit (2 + 3 + 0.75 + 1.5 + 0.75 min; the full registry is `align-ti bench --device cuda`).
#
# Wheels the machine lacks (liger-kernel, for comparison) travel in .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl liger-kernel
# Usage: bash scripts/gpu_check.sh            (then commit $OUT's results into benchmarks/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
work=$(mktemp -d)
start=$SECONDS
log() { echo "[gpu_check $((SECONDS - start))s] $*" | tee -a "$OUT/gpu_check.log"; }

# The project without dependencies, into the torch that is already there (editable, so the
# repo's own files run). Where pip cannot build offline, the repo root on PYTHONPATH does the
# same: align_ti then finds kernels/ and benchmarks/ beside itself.
if python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$work/pip.log" 2>&1; then
  log "installed align-ti (editable, no dependencies)"
else
  log "pip could not install offline ($(tail -1 "$work/pip.log")); using the repo root on PYTHONPATH"
fi
site="$work/site"
mkdir -p "$site"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    && log "installed carried wheels: $(ls .whl | tr '\n' ' ')"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi >"$work/nvidia-smi.txt" 2>&1
python3 -m align_ti.cli env | tee "$work/env.txt"

log "GPU tests"
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 tests 2>&1 | tee "$work/pytest-gpu.log"
tests_rc=${PIPESTATUS[0]}
log "GPU tests exit $tests_rc"

log "CUDA benchmarks"
timeout 180 python3 -m align_ti.benchmarks.runner --device cuda --quick --out "$work/results" 2>&1 | tee "$work/bench.log"
bench_rc=${PIPESTATUS[0]}
log "benchmarks exit $bench_rc"
log "TPA expanded-forward benchmark"
timeout 45 python3 -m align_ti.benchmarks.branches --device cuda --out "$work/results" 2>&1 | tee "$work/bench-branches.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
log "end-to-end distillation step benchmark (0.5B-shaped student, 7B-shaped teacher)"
timeout 90 python3 -m align_ti.benchmarks.train_step --device cuda --scale full --steps 2 --out "$work/results" 2>&1 | tee "$work/bench-train-step.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
log "IVA term's share of a vanilla-KD step (same models, alternating steps)"
timeout 45 python3 -m align_ti.benchmarks.train_step --device cuda --scale full --iva-share --steps 3 --out "$work/results" 2>&1 | tee "$work/bench-iva-share.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1

# Few files come back from a lent machine: one archive holds everything, plus the summaries.
cat "$work"/results/*.md >"$OUT/summary.md" 2>/dev/null
tar czf "$OUT/gpu-results.tar.gz" -C "$work" --exclude site .
log "done in $((SECONDS - start))s; tests exit $tests_rc, benchmarks exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
