#!/usr/bin/env bash
# The project's test command (README "Run the tests"; CI runs exactly this).
# Three tiers, each its own pytest process with its own time budget:
#   cpu        unit tests on the CPU paths and the references           budget 6 min
#   interpret  Triton kernels on CPU tensors, TRITON_INTERPRET=1 set     budget 6 min
#              before triton is imported (fp32/fp16 only)
#   e2e        demo, resume, faults, the FlexAttention training step          budget 8 min
#   dist       2-process runs (gloo): DDP with a sharded teacher, FSDP2, DeepSpeed ZeRO-3
#              (skipped without deepspeed), each against one process     budget 2.5 min
#   oldest     (not in the default; CI runs it) the trainer, model and TPA tests on the oldest
#              transformers and accelerate setup.py allows, installed from the package index
#              into a scratch folder put first on PYTHONPATH              budget 5 min
# A tier that runs past twice its budget is killed and fails; past its budget it warns.
# Usage: bash scripts/test.sh [cpu|interpret|e2e|dist|oldest ...]   (default: cpu interpret e2e dist)
set -uo pipefail
cd "$(dirname "$0")/.."

tiers=("$@")
[ ${#tiers[@]} -eq 0 ] && tiers=(cpu interpret e2e dist)
# the dist tier's files (e2e tests that start 2 processes; the e2e tier leaves them out)
DIST_TESTS=(tests/train/test_multiprocess.py tests/train/test_fsdp.py tests/train/test_deepspeed.py)
no_dist=()
for f in "${DIST_TESTS[@]}"; do no_dist+=("--ignore=$f"); done
PY=${PYTHON:-python}
failed=()

run_tier() {  # name budget_seconds env... -- pytest args...
  local name=$1 budget=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "=== tier $name (budget ${budget}s) ==="
  local start=$SECONDS
  env "${envs[@]}" timeout $((2 * budget)) "$PY" -m pytest --durations=10 "$@"
  local rc=$? took=$((SECONDS - start))
  # pytest exits 5 when a tier selects no test (e.g. no e2e tests exist yet): not a failure.
  if [ $rc -eq 5 ]; then echo "tier $name: no tests selected"; rc=0; fi
  [ $rc -eq 124 ] && echo "tier $name: killed after $((2 * budget))s"
  echo "tier $name: exit $rc in ${took}s (budget ${budget}s)"
  [ $took -gt "$budget" ] && echo "WARNING: tier $name ran past its budget"
  [ $rc -ne 0 ] && failed+=("$name")
}

for tier in "${tiers[@]}"; do
  case $tier in
    cpu)       run_tier cpu 360 OMP_NUM_THREADS=2 -- -q -m "not interpret and not e2e and not gpu" ;;
    interpret) run_tier interpret 360 TRITON_INTERPRET=1 OMP_NUM_THREADS=2 -- -q -m "interpret and not gpu" ;;
    e2e)       run_tier e2e 480 OMP_NUM_THREADS=1 -- -q -m "e2e and not gpu" "${no_dist[@]}" ;;
    dist)      run_tier dist 150 OMP_NUM_THREADS=1 -- -q -m "e2e and not gpu" "${DIST_TESTS[@]}" ;;
    oldest)
      # the floors of setup.py's transformers and accelerate requirements, e.g. "transformers>=5.17"
      floor() { sed -n "s/.*\"$1>=\([0-9.]*\)\".*/\1/p" setup.py | head -1; }
      tf=$(floor transformers) acc=$(floor accelerate)
      site=$(mktemp -d)
      if "$PY" -m pip install -q --target "$site" "transformers==$tf" "accelerate==$acc" >"$site.log" 2>&1; then
        rm -rf "$site"/numpy* "$site"/torch*  # keep the environment's own numpy and torch
        run_tier "oldest (transformers $tf, accelerate $acc)" 300 OMP_NUM_THREADS=1 PYTHONPATH="$site" -- \
          -q -p no:cacheprovider -m "not gpu" tests/train tests/models tests/ops/test_branches.py
      else
        echo "tier oldest: could not install transformers==$tf accelerate==$acc: $(tail -1 "$site.log")"
        failed+=(oldest)
      fi
      rm -rf "$site" "$site.log" ;;
    *) echo "unknown tier $tier (cpu, interpret, e2e, dist, oldest)"; exit 2 ;;
  esac
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "FAILED tiers: ${failed[*]}"
  exit 1
fi
echo "all tiers passed: ${tiers[*]}"
