"""Several processes: the frozen teacher sharded with FSDP2 (``teacher_sharding=fsdp``), and the
decisions every process must take alike.

The student's engine (DDP, FSDP2, DeepSpeed ZeRO-3) is accelerate's; the teacher is not a
submodule of the trained wrapper, so no engine touches it. Replicated (the default), each process
holds the whole teacher: a 7-8B teacher costs 15-16 GiB of every GPU and a 72B one fits none.
Sharded, each process holds 1/N of its weights:

- every decoder layer (a class the model names in ``_no_split_modules``) and the base model
  (``teacher.model``: embeddings, vision tower, projector, final norm) are FSDP2 units,
  gathered one at a time by their own forward and freed after it (the vision tower is no unit
  of its own: a micro-batch without images skips it, `layer_classes`);
- the LM head (which the fused ops read directly, not through a forward) is a DTensor sharded
  by rows; `gathered_teacher` gathers it once per step around the module's forward, and the
  autograd graph that reads it keeps it until the backward is done;
- no gradient, no optimizer state and no checkpoint: the teacher is frozen and never saved.

Because every forward of a sharded teacher is a collective, every process must run the same
forwards in the same order: no forward is skipped depending on the data, and decisions such as
the IRS cache hit are taken on one process and shared (`agree_on`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["shard_teacher", "is_sharded", "gathered_teacher", "agree_on", "any_process", "vision_modules",
           "layer_classes"]


def _dist():
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def _world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The vision tower and projector of a transformers multimodal model (empty for a text model)."""
    base = getattr(model, "model", model)
    return [m for name in ("vision_tower", "visual", "multi_modal_projector")
            if isinstance(m := getattr(base, name, None), nn.Module)]


def layer_classes(model: nn.Module) -> list[str]:
    """The layer classes of ``model._no_split_modules`` that FSDP makes units of: the language
    model's, not the vision tower's. A micro-batch without images skips the vision tower, so its
    layers must not be units of their own (their all-gathers would run on some processes only and
    deadlock); they stay in the unit that holds the base model, gathered by every forward."""
    names = list(getattr(model, "_no_split_modules", None) or ())
    in_vision = {type(m).__name__ for v in vision_modules(model) for m in v.modules()}
    return [n for n in names if n not in in_vision]


def shard_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """Shard a frozen transformers teacher over all processes of the default group with FSDP2 (in
    place; its local shards move to ``device``). Either every process holds the whole teacher (on
    the CPU: only the shards reach the accelerator), or process 0 does and the others hold it on
    the meta device (`build_trainer`'s way: one copy in host memory, not one per process), in which
    case process 0's weights and buffers are scattered to the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist = _dist()
    if dist is None:
        raise ValueError("teacher_sharding='fsdp' needs several processes (accelerate launch / torchrun); "
                         "with one process use teacher_sharding='replicate'")
    base = getattr(teacher, "model", None)
    if base is None:
        raise TypeError(f"teacher_sharding='fsdp': {type(teacher).__name__} has no .model (expected a transformers "
                        "LLaVA or causal LM)")
    on_meta = any(p.is_meta for p in teacher.parameters())
    from_process_0 = any_process("meta" if on_meta else None) is not None
    if from_process_0 and dist.get_rank() == 0 and on_meta:
        raise ValueError("shard_teacher: process 0 must hold the teacher's weights (the others may hold it on meta)")
    full = teacher.state_dict() if from_process_0 and not on_meta else {}  # process 0's weights, kept for the scatter
    teacher.eval()
    teacher.requires_grad_(False)
    mesh = init_device_mesh(torch.device(device).type, (_world(),))
    units = set(layer_classes(teacher))
    for module in list(base.modules()):
        if module is not base and type(module).__name__ in units:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(base, mesh=mesh, reshard_after_forward=True)
    head = teacher.get_output_embeddings()
    for name in ("weight", "bias"):  # an untied head (a tied one is the embedding's, in `base`)
        value = getattr(head, name, None)
        if value is not None and not isinstance(value, DTensor):
            local = value.detach() if value.is_meta else value.detach().to(device)
            # src_data_rank=None: each process cuts its own rows, no communication (a meta one has none)
            setattr(head, name, nn.Parameter(distribute_tensor(local, mesh, [Shard(0)], src_data_rank=None),
                                             requires_grad=False))
    if on_meta:
        teacher.to_empty(device=device)
    if from_process_0:
        set_model_state_dict(teacher, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in teacher.buffers():  # non-persistent ones (rotary frequencies) are in no state dict
            dist.broadcast(buffer, src=0)
    return teacher


def is_sharded(model: Optional[nn.Module]) -> bool:
    """Whether ``model`` holds DTensor (FSDP2-sharded) parameters."""
    from torch.distributed.tensor import DTensor

    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gathered_teacher(teacher: Optional[nn.Module]):
    """Around one forward of the distillation module: a sharded teacher's LM head whole (one
    all-gather; the fused ops read it directly), and afterwards every unit of the teacher sharded
    again (FSDP2 keeps the root unit gathered after a forward, expecting a backward that a frozen
    teacher never runs). A replicated teacher (or None) is left alone."""
    if not is_sharded(teacher):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    head = teacher.get_output_embeddings()
    saved = {name: getattr(head, name) for name in ("weight", "bias")
             if isinstance(getattr(head, name, None), DTensor)}
    try:
        for name, sharded in saved.items():
            setattr(head, name, nn.Parameter(sharded.full_tensor(), requires_grad=False))
        yield
    finally:
        for name, sharded in saved.items():
            setattr(head, name, sharded)
        for module in teacher.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def agree_on(value: Any) -> Any:
    """Process 0's ``value`` on every process (a broadcast; ``value`` itself with one process).
    For decisions that every process must take alike, e.g. whether a cache is valid."""
    dist = _dist()
    if dist is None or _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(message: Optional[str]) -> Optional[str]:
    """The first non-None of every process's ``message`` (an all-gather), None when all are None:
    an error seen on one process, raised on all of them."""
    dist = _dist()
    if dist is None or _world() == 1:
        return message
    gathered: list = [None] * _world()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m is not None), None)
