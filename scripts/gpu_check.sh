#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU and no network (e.g. a lent H100/H200):
# GPU tests, then the CUDA benchmarks, everything written under $OUT (default ./gpu-results).
#
# The whole run fits GPU_CHECK_BUDGET_S seconds (default 470, counted from the script's start,
# installs included; all stages want ~900: pass what the lease allows, e.g. 700): stages run in
# order of importance, each under its own limit cut to what is left of the budget, so a slow
# stage costs the ones after it, never the deadline. Each benchmark writes its results as it
# goes, so a stage stopped by its limit still leaves the cases it finished, and the archive in
# $OUT is rewritten after every stage, so a run cut short still brings back what it did.
# GPU_CHECK_STAGES picks stages (space-separated names, default all):
#   tests train_step train_variants fused_kl train_qwen compat profile train_paper attention_mass topk_align iva
#   fused_kl_full fsdp branches
#
# Wheels the machine lacks (liger-kernel, for comparison) travel in .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl liger-kernel
# A copy of the tree without .git: set ALIGN_TI_GIT_COMMIT=<sha> so results name their commit.
# Usage: bash scripts/gpu_check.sh            (then commit $OUT's results into benchmarks/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
STAGES=${GPU_CHECK_STAGES:-tests train_step train_variants fused_kl train_qwen compat profile train_paper attention_mass topk_align iva fused_kl_full fsdp branches}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
work=$(mktemp -d)
res="$work/results"
start=$SECONDS
failed=""
skipped=""
log() { echo "[gpu_check $((SECONDS - start))s] $*" | tee -a "$OUT/gpu_check.log"; }

# Few files come back from a lent machine: one archive holds everything, plus the summaries.
pack() {
  cat "$res"/*.md >"$OUT/summary.md" 2>/dev/null
  tail -n 60 "$work/tests.log" >"$OUT/tests-tail.log" 2>/dev/null
  tar czf "$OUT/gpu-results.tar.gz" -C "$work" --exclude site . 2>/dev/null
}

# stage NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, what is left of the budget), its output
# in $work/NAME.log; a stage not named in GPU_CHECK_STAGES, or with < 10 s left, is skipped.
stage() {
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - (SECONDS - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    log "$name: skipped (budget spent)"
    skipped="$skipped $name"
    return 0
  fi
  log "$name: start (limit ${limit}s)"
  timeout "$limit" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc$([ $rc -eq 124 ] && echo ' (time limit)')"
  [ $rc -eq 0 ] || failed="$failed $name"
  pack
}

# The project without dependencies, into the torch that is already there (editable, so the
# repo's own files run). Where pip cannot build offline, run from a copy of the tree laid out as
# a wheel installs it (benchmarks/ and kernels/ inside align_ti/), so that `align_ti.benchmarks`
# and `align_ti.kernels` import with the copy's root first on the path.
if python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$work/pip.log" 2>&1; then
  log "installed align-ti (editable, no dependencies)"
else
  log "pip could not install offline ($(tail -1 "$work/pip.log")); running from a copy laid out as installed"
  OUT=$(cd "$OUT" && pwd)
  commit=$(git rev-parse HEAD 2>/dev/null) && export ALIGN_TI_GIT_COMMIT=${ALIGN_TI_GIT_COMMIT:-$commit}
  tree="$work/tree"
  mkdir -p "$tree"
  tar cf - --exclude=./.git --exclude=./gpu-results . | tar xf - -C "$tree"
  cp -r "$tree/benchmarks" "$tree/align_ti/benchmarks"
  cp "$tree"/kernels/*.py "$tree/align_ti/kernels/"
  cd "$tree" || exit 1
fi
site="$work/site"
mkdir -p "$site"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    && log "installed carried wheels: $(ls .whl | tr '\n' ' ')"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi >"$work/nvidia-smi.txt" 2>&1
python3 -m align_ti.cli env >"$work/env.txt" 2>&1
timeout_flag=""
python3 -c "import pytest_timeout" 2>/dev/null && timeout_flag="--timeout=60"

# the model families' GPU tests build processors that need torchvision (the [vlm] extra)
families_flag=""
if ! python3 -c "import torchvision" 2>/dev/null; then
  log "tests: the image has no torchvision: the model families' GPU tests are skipped (pip install 'align-ti[vlm]')"
  families_flag="--deselect tests/models/test_families.py"
fi

# in order of importance (issue 20): correctness; Align-TI / vanilla-KD at both shapes with
# prefix-cached TPA, beside the design before it (expanded + a KL call per term), with the FLOP
# model's ratios; the bf16 weight-gradient mode and FlexAttention; the fused KL at equal memory
# against Liger's chunks; then the rest
stage tests 150 python3 -m pytest -m gpu -v -rfE --tb=short -p no:cacheprovider $timeout_flag --durations=10 \
  $families_flag tests
stage train_step 120 python3 -m align_ti.benchmarks.train_step --device cuda --scale full --family llava \
  --case long-response,llava-665k --ways "align-ti,align-ti expanded+per_term" --warmup 1 --rounds 2 --steps 2 \
  --out "$res"
# the bf16 weight-gradient mode, and the step on FlexAttention (TPA's expanded sequence block-sparse)
# against SDPA, same run (recompiles logged: past dynamo's limit flex falls back to an unfused, slow,
# memory-hungry path)
stage train_variants 150 env TORCH_LOGS=recompiles python3 -m align_ti.benchmarks.train_step --device cuda \
  --scale full --family llava --case long-response --ways "align-ti,align-ti bf16-dw,align-ti flex" --steps 2 \
  --stem train_step-variants --out "$res"
# the quick case (N=8192, the Qwen2.5-1.5B / Qwen2-7B heads): align_ti at its default and smaller
# row-chunk budgets, Liger-Kernel at chunks 128-1024; the report compares each peer at equal memory
stage fused_kl 90 python3 -m align_ti.benchmarks.runner --device cuda --quick --op fused_kl --out "$res"
# the Qwen2.5-VL 7B -> 3B pair (issue 19): multimodal RoPE, unequal vocabularies, bf16
stage train_qwen 120 python3 -m align_ti.benchmarks.train_step --device cuda --scale full --family qwen2_5_vl \
  --case llava-665k,long-response --ways "align-ti,align-ti expanded+per_term" --steps 2 \
  --stem train_step-qwen2_5_vl --out "$res"
# the image's transformers is older than CI's: the trainer's loss scaling under accumulation
stage compat 60 python3 -m pytest -q -p no:cacheprovider tests/train/test_trainer.py \
  -k "gradient_accumulation or terms_match or kernel_options"
stage profile 60 python3 -m align_ti.benchmarks.profile_cuda --out "$res"
# the paper-code way (eager, materialised logits), and where each way's GPU time goes
stage train_paper 150 python3 -m align_ti.benchmarks.train_step --device cuda --scale full --family llava \
  --case long-response \
  --ways "paper-code,align-ti,align-ti expanded+per_term" --steps 2 --profile --stem train_step-paper --out "$res"
stage attention_mass 40 python3 -m align_ti.benchmarks.runner --device cuda --op attention_mass --out "$res"
stage topk_align 40 python3 -m align_ti.benchmarks.runner --device cuda --quick --op topk_align --out "$res"
stage iva 45 python3 -m align_ti.benchmarks.train_step --device cuda --scale full --iva-share --steps 3 --out "$res"
# the whole fused_kl registry: the sweep over N (the plot) and torch.compile of the plain path
stage fused_kl_full 150 python3 -m align_ti.benchmarks.runner --device cuda --op fused_kl --out "$res"
# the Trainer under accelerate's FSDP2 (configs/accelerate/fsdp2.yaml) on one GPU, the path the CPU
# tests cannot take (accelerate turns FSDP on only for GPUs): 3 steps with a sharded checkpoint at
# step 2, --resume from it to step 4; the checkpoint must hold the sharded model and optimizer
# (not a DDP fallback's files) and the final student must load with from_pretrained
fsdp_out="$work/fsdp-run"
fsdp_launch="python3 -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 \
  -m align_ti.cli distill output_dir=$fsdp_out synthetic_images=2 per_device_train_batch_size=4 iva_layer=1 bf16=true \
  training_args='{\"save_steps\": 2, \"logging_steps\": 1, \"disable_tqdm\": true}'"
stage fsdp 150 bash -c "set -e; $fsdp_launch max_steps=3; test -d $fsdp_out/checkpoint-2/pytorch_model_fsdp_0; \
  test -d $fsdp_out/checkpoint-2/optimizer_0; $fsdp_launch max_steps=4 --resume; \
  python3 -c \"import torch; from transformers import LlavaForConditionalGeneration as M; \
m = M.from_pretrained('$fsdp_out'); assert all(bool(torch.isfinite(p).all()) for p in m.parameters()); print('fsdp: ok')\""
# the qwen-shaped TPA expanded forwards (the tiny ones are measured on the CPU); two earlier
# runs spent their 90 s in the first qwen case, hence last and with 2 repetitions
stage branches 90 python3 -m align_ti.benchmarks.branches --device cuda --models qwen --reps 2 --out "$res"

pack
log "done in $((SECONDS - start))s; failed or stopped:${failed:- none}; skipped (budget):${skipped:- none}"
[ -z "$failed" ]
