"""FSDP2: two gloo processes give the one-process loss curve and final weights, with a sharded
checkpoint saved and resumed, and a teacher sharded with FSDP2 gives the replicated teacher's loss.

accelerate turns FSDP on only for GPU modes (on CPU `prepare()` returns DDP), so a Trainer run
here would test DDP. Instead the worker wraps the `DistillModule` with the function accelerate's
FSDP2 path calls (`accelerate.utils.fsdp_utils.fsdp2_prepare_model`, with the plugin that
``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` sets up: per-layer units from
``_no_split_modules``, the student's LM head in the root unit, gathered by the module's forward
where the fused ops read it) and trains
it with the Trainer's normalisers (`tests.utils.dist_train`). It asserts that the student's
parameters are DTensors, so a run that fell back to DDP fails. scripts/gpu_check.sh (stage
`fsdp`) runs the Trainer itself under `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
on a GPU.

Run as a script under torchrun (2 processes), this file is the worker:
- steps 1-3 from the initial weights, a DCP checkpoint (model + optimizer, sharded) after step 2;
- a fresh module loads that checkpoint and runs step 3 again with the teacher sharded
  (``teacher_sharding=fsdp``): the same loss and weights as the first run's step 3;
- the teacher's parameter bytes per process, replicated and sharded;
- one step with images on process 0 and none on process 1 (the vision tower runs on one process):
  no deadlock;
- NaN images on process 1 only: both processes stop with the divergence error of the pass that
  draws TPA's candidates (one process alone would leave the other in a collective).
"""
import copy
import datetime
import math
import os
import resource
import sys

import pytest
import torch

pytestmark = pytest.mark.e2e

SAVE_AFTER = 2  # steps before the checkpoint


def _accelerate_fsdp2(module):
    """Wrap ``module`` as accelerate's FSDP2 path does for `DistillTrainer` on GPUs, with the
    plugin that ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` configures (the
    test hands the worker that launch's FSDP environment)."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment
    assert plugin.fsdp_version == 2, "the worker did not get configs/accelerate/fsdp2.yaml's environment"
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  mixed_precision="no", is_main_process=torch.distributed.get_rank() == 0,
                                  device=torch.device("cpu"), parallelism_config=None)
    return fsdp2_prepare_model(accelerator, module)


def _param_bytes(model) -> int:
    """Bytes of ``model``'s parameters held by this process (a DTensor's local shard)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())


def _full_student(module) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}


def _fsdp_run(run, student):
    """(module, optimizer, update) of a fresh FSDP2-wrapped module over ``student``."""
    from tests.utils import dist_module, dist_optimizer

    module, _ = dist_module(run, student=student)
    module = _accelerate_fsdp2(module)
    opt = dist_optimizer(module.parameters())

    def update(loss):
        loss.backward()
        opt.step()
        opt.zero_grad()

    return module, opt, update


def _text_only_on_rank_1(run, batch) -> dict:
    """Process 1's micro-batch without images (the same questions, text only): the vision tower
    runs on process 0 only, which must not deadlock the processes."""
    import torch.distributed as dist

    from align_ti.train.data import DistillCollator, EncodedDataset

    if dist.get_rank() != 1:
        return batch
    items = [{**item, "image": None} for item in run.items[:2]]
    return DistillCollator(run.processor.tokenizer.pad_token_id)(list(EncodedDataset(items, run.processor)))


def _diverge_on_rank_1(module, batch) -> list:
    """Every process's error when only process 1's images are NaN: the check of the pass that
    draws TPA's candidates must stop all processes, not leave process 0 in the next collective."""
    import torch.distributed as dist

    from align_ti.train.loss import NonFiniteLossError
    from align_ti.train.sharding import gathered_teacher

    batch = dict(batch)
    if dist.get_rank() == 1:
        batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
    try:
        with gathered_teacher(module.teacher):
            module(**batch)
        error = None
    except NonFiniteLossError as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def worker(out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from align_ti.train.sharding import shard_teacher
    from tests.utils import DIST_STEPS, dist_batches, dist_train, tiny_run

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a hang fails within a minute
    rank, world = dist.get_rank(), dist.get_world_size()
    run = tiny_run(n_images=3)
    initial = copy.deepcopy(run.student)
    batches = dist_batches(run, rank, world)
    module, opt, update = _fsdp_run(run, copy.deepcopy(initial))
    not_sharded = [n for n, p in module.named_parameters() if not isinstance(p, DTensor)]
    assert not not_sharded, f"not FSDP2-sharded: {not_sharded[:3]}"
    units = [type(m).__name__ for m in module.modules() if isinstance(m, FSDPModule)]
    assert units.count("FSDPQwen2DecoderLayer") == len(run.student.model.language_model.layers), units
    logs = dist_train(module, update, module, batches[:SAVE_AFTER])
    ckpt_dir = os.path.join(os.path.dirname(out), "dcp")
    model_sd, optim_sd = get_state_dict(module, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    logs += dist_train(module, update, module, batches[SAVE_AFTER:], first_step=SAVE_AFTER)
    weights = _full_student(module)

    replicated = _param_bytes(run.teacher)
    shard_teacher(run.teacher, torch.device("cpu"))
    sharded = _param_bytes(run.teacher)
    module2, opt2, update2 = _fsdp_run(run, copy.deepcopy(initial))
    model_sd, optim_sd = get_state_dict(module2, opt2)
    state = {"model": model_sd, "optim": optim_sd}
    # partial: a fresh optimizer has (zero) state for the parameters that get no gradient (the
    # SigLIP tower's post_layernorm), which the trained one never created
    dcp.load(state, checkpoint_id=ckpt_dir, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(module2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = dist_train(module2, update2, module2, batches[SAVE_AFTER:], first_step=SAVE_AFTER)
    resumed_weights = _full_student(module2)
    mixed = dist_train(module2, update2, module2, [_text_only_on_rank_1(run, batches[0])], first_step=DIST_STEPS)
    diverged = _diverge_on_rank_1(module2, batches[0])
    memory = torch.tensor([replicated, sharded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.float64)
    every = [torch.zeros_like(memory) for _ in range(world)]
    dist.all_gather(every, memory)
    if rank == 0:
        torch.save({"world": world, "logs": logs, "weights": weights, "resumed": resumed,
                    "resumed_weights": resumed_weights, "memory": [m.tolist() for m in every],
                    "diverged": diverged, "mixed": mixed}, out)
    dist.destroy_process_group()


def test_fsdp2_two_processes_match_one_and_resume(tmp_path):
    from tests.utils import (DIST_STEPS, accelerate_has_fsdp2, accelerate_launch_env, assert_dist_matches,
                             dist_baseline, dist_launch, tiny_run)

    if torch.cuda.is_available():
        pytest.skip("the CPU (gloo) check; scripts/gpu_check.sh runs FSDP on a GPU")
    if not accelerate_has_fsdp2():
        pytest.skip("accelerate < 1.6 has no FSDP2 (configs/accelerate/fsdp2.yaml needs 1.6)")
    _, env = accelerate_launch_env("configs/accelerate/fsdp2.yaml", "--mixed_precision", "no")  # fp32 here
    fsdp_env = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_")) and k not in os.environ}
    got = dist_launch(__file__, tmp_path / "fsdp.pt", env_extra=fsdp_env)
    ref_logs, ref_weights = dist_baseline(tiny_run(n_images=3))
    assert got["world"] == 2 and len(got["logs"]) == DIST_STEPS
    assert_dist_matches(got["logs"], got["weights"], ref_logs, ref_weights)
    # the resumed step with the sharded teacher: the uninterrupted run's step and weights
    assert_dist_matches(got["resumed"], got["resumed_weights"], got["logs"][SAVE_AFTER:], got["weights"])
    for replicated, sharded, _rss in got["memory"]:
        assert sharded <= 0.6 * replicated, (replicated, sharded)  # each process holds about half
    assert len(got["mixed"]) == 1 and all(math.isfinite(v) for v in got["mixed"][0])  # and no deadlock
    for error in got["diverged"]:
        assert error is not None and "the pass that draws TPA's candidates" in error, got["diverged"]


if __name__ == "__main__":
    worker(sys.argv[1])
