"""DeepSpeed ZeRO-3: two gloo processes give the one-process loss curve and final weights, with
the teacher sharded with FSDP2 (``teacher_sharding=fsdp``) beside the DeepSpeed student.

Plain DeepSpeed on the CPU (``DS_ACCELERATOR=cpu``, gloo, torch's SGD as a client optimizer): `accelerate launch
--use_deepspeed` does not start a working CPU run (both processes report index 0). Every
parameter is partitioned (``stage3_param_persistence_threshold: 0``), the student's LM head
included, so the fused ops read it only because `DistillModule.register_zero3_heads` registers it
as an external parameter of the module's forward (without it they would read an empty
partition). DeepSpeed is optional (``pip install -e ".[deepspeed]"``); without it the test is
skipped.

Run as a script under torchrun (2 processes), this file is the worker.
"""
import copy
import sys

import pytest
import torch

pytestmark = pytest.mark.e2e


def worker(out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from align_ti.train.sharding import shard_teacher
    from tests.utils import DIST_GLOBAL_BATCH, dist_batches, dist_module, dist_optimizer, dist_train, tiny_run

    torch.set_num_threads(1)
    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op at start-up (~50 s on
    # two cores, cached afterwards); gloo's all-reduce does the same job here
    deepspeed.comm.torch.build_shm_op = lambda: None
    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = tiny_run(n_images=3)
    shard_teacher(run.teacher, torch.device("cpu"))
    module, _ = dist_module(run, student=copy.deepcopy(run.student))
    module.register_zero3_heads()
    config = {
        "train_micro_batch_size_per_gpu": DIST_GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
    }
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=dist_optimizer(module.parameters()), config=config)
    head = module.student.get_output_embeddings().weight
    assert head.ds_tensor.numel() < head.ds_numel, "the LM head is not partitioned"

    def update(loss):
        engine.backward(loss)
        engine.step()

    logs = dist_train(engine, update, module, dist_batches(run, rank, world))
    params = list(module.student.parameters())
    with deepspeed.zero.GatheredParameters(params):
        weights = {k: v.detach().clone() for k, v in module.student.named_parameters()}
    if rank == 0:
        torch.save({"world": world, "logs": logs, "weights": weights}, out)
    dist.barrier()


def test_zero3_two_processes_match_one(tmp_path):
    pytest.importorskip("deepspeed")
    from tests.utils import DIST_STEPS, assert_dist_matches, dist_baseline, dist_launch, tiny_run

    got = dist_launch(__file__, tmp_path / "zero3.pt", env_extra={"DS_ACCELERATOR": "cpu"})
    ref_logs, ref_weights = dist_baseline(tiny_run(n_images=3))
    assert got["world"] == 2 and len(got["logs"]) == DIST_STEPS
    assert_dist_matches(got["logs"], got["weights"], ref_logs, ref_weights)


if __name__ == "__main__":
    worker(sys.argv[1])
