"""Building a distillation run from a `DistillConfig`: the TrainingArguments, the models,
data and IVA layer (`build_trainer`), and the run itself with its final save and SIGTERM
handling (`run_distill`, what `align-ti distill` calls).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any

import torch
from transformers import TrainingArguments

from align_ti.models.families import family_of, set_trainable
from align_ti.models.irs import cached_irs_layer
from align_ti.ops.branches import forbidden_token_ids
from align_ti.train import checkpoint as ckpt
from align_ti.train.config import save_config
from align_ti.train.data import (
    DistillCollator,
    EncodedDataset,
    check_image_expansion,
    check_same_encoding,
    check_same_positions,
    check_tokenizers,
    language_model_attention,
    load_items,
    load_model_and_processor,
)
from align_ti.train.loss import DistillModule, LossSpec, NonFiniteLossError, lm_head
from align_ti.train.sharding import agree_on, any_process, gathered_teacher, shard_teacher
from align_ti.train.trainer import CheckpointError, DistillTrainer, resolve_resume

__all__ = ["resolve_iva_layer", "training_arguments", "build_module", "build_trainer", "run_distill"]


def resolve_iva_layer(config, teacher, processor, items, cache_dir: str, is_main: bool = True) -> int:
    """``config.iva_layer`` as an int: itself, or for "auto" the IRS argmax of the teacher over
    ``config.irs_samples`` calibration pairs from the training items (samples sharing an image),
    cached in ``<cache_dir>/irs.json`` (`align_ti.models.irs.cached_irs_layer`; reused when the
    teacher -- its path, files (`checkpoint.folder_digest`) and layer count --, the tiny text
    model, the data, the seed and the sample count match). With several processes, process 0
    decides whether the cache holds (all of them then run IRS, or none: a sharded teacher's
    forwards are collectives) and only ``is_main`` writes it."""
    if config.iva_layer != "auto":
        n = teacher.config.get_text_config().num_hidden_layers
        layer = int(config.iva_layer)
        if not -n <= layer < n:
            raise ValueError(f"config iva_layer={layer} is out of range for a teacher with {n} decoder layers")
        return layer % n
    is_folder = os.path.isdir(config.teacher)
    key = {"teacher": os.path.abspath(config.teacher) if is_folder else config.teacher,
           "teacher_files": ckpt.folder_digest(config.teacher) if is_folder else None,
           "tiny_text_model": config.tiny_text_model, "irs_samples": config.irs_samples, "data": config.data,
           "seed": config.seed}
    with gathered_teacher(teacher):  # IRS calls the teacher's own forward, which reads its head
        return cached_irs_layer(teacher, processor, items, config.irs_samples, cache_dir, key, decide=agree_on,
                                write=is_main)


def training_arguments(config, **extra) -> TrainingArguments:
    """TrainingArguments from a DistillConfig (``config.training_args`` overrides the defaults)."""
    kw: dict[str, Any] = dict(
        output_dir=config.output_dir, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs, bf16=config.bf16 and torch.cuda.is_available(),
        seed=config.seed, data_seed=config.seed, remove_unused_columns=False, report_to=[],
        logging_steps=10, save_strategy="steps", save_steps=500, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    kw.update(extra)
    kw.update(config.training_args)
    try:
        return TrainingArguments(**kw)
    except TypeError as e:
        raise ValueError(f"config training_args: {e}") from e


def _load_teacher_for_sharding(config, dtype: torch.dtype, attn: str):
    """``(teacher, processor)`` for ``teacher_sharding=fsdp``: process 0 loads the weights, the
    others build the model on the meta device (a 72B teacher would otherwise take 146 GB of host
    memory in every process); `shard_teacher` then scatters process 0's weights. An error loading
    it on process 0 is raised on every process (the others would wait in the scatter)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # the processes of accelerate launch
    if state.num_processes <= 1:
        raise ValueError("config teacher_sharding='fsdp' needs several processes (accelerate launch); with one "
                         "process use teacher_sharding='replicate'")
    loaded, error = None, None
    try:
        if state.is_main_process:
            loaded = load_model_and_processor(config.teacher, config.tiny_text_model, seed=config.seed + 1,
                                              dtype=dtype, attn_implementation=attn,
                                              processor_args=config.processor_args)
        else:
            loaded = _teacher_on_meta(config, dtype, attn)
    except Exception as e:  # noqa: BLE001 -- every process must hear of it, then it is raised
        error = e
    message = any_process(None if error is None else f"{type(error).__name__}: {error}")
    if message is not None:
        raise error if error is not None else RuntimeError(f"process 0 could not load the teacher: {message}")
    return loaded


def _teacher_on_meta(config, dtype: torch.dtype, attn: str):
    """The teacher's structure without its weights (meta device) and its processor."""
    if config.teacher in ("tiny-teacher", "tiny-student"):
        with torch.device("meta"):
            model, _ = load_model_and_processor(config.teacher, config.tiny_text_model, seed=config.seed + 1,
                                                dtype=dtype, attn_implementation=attn)
        from align_ti.models.tiny import build_processor

        return model, build_processor(config=model.config)
    from transformers import AutoConfig, AutoProcessor

    from align_ti.models.families import family_of

    model_config = AutoConfig.from_pretrained(config.teacher, local_files_only=True)
    with torch.device("meta"):
        model = family_of(model_config, f"model {config.teacher!r}").model_class()._from_config(
            model_config, dtype=dtype, attn_implementation=language_model_attention(attn))
    return model, AutoProcessor.from_pretrained(config.teacher, local_files_only=True, **config.processor_args)


def build_module(config, student, teacher, processor, iva_layer=None) -> DistillModule:
    """The `DistillModule` of a config: its `LossSpec` (``iva_layer`` resolved), and for TPA the
    tokens candidates never take (special tokens, padding rows of the heads)."""
    spec = LossSpec.from_config(config, iva_layer=iva_layer)
    tok = processor.tokenizer
    forbidden, vocab_limit = (), None
    if spec.w_tpa > 0:
        forbidden, vocab_limit = forbidden_token_ids(student, tok)
        vocab_limit = min(vocab_limit, lm_head(student)[0].shape[0], lm_head(teacher)[0].shape[0])
    image_token_id = family_of(student, "student").image_token_id(student.config)
    return DistillModule(student, teacher, spec, image_token_id=image_token_id,
                         pad_token_id=tok.pad_token_id, forbidden_ids=forbidden, vocab_limit=vocab_limit)


def build_trainer(config, student=None, teacher=None, processor=None, teacher_processor=None,
                  train_dataset=None, items=None, callbacks=None, iva_layer=None, **args_overrides):
    """A ready `DistillTrainer` for a `DistillConfig`. Models, processor and data are loaded
    from the config unless given (the demo passes its own trained teacher and encoded data)."""
    spec_probe = LossSpec.from_config(config)
    t_dtype = torch.bfloat16 if (config.bf16 and torch.cuda.is_available()) else torch.float32
    attn = getattr(config, "attn_implementation", "sdpa")
    if attn == "flex_attention" and not torch.cuda.is_available():
        raise ValueError("config attn_implementation='flex_attention' needs a CUDA device (FlexAttention "
                         "has no backward on CPU); use 'sdpa' here")
    if student is None:
        student, processor = load_model_and_processor(config.student, config.tiny_text_model, seed=config.seed,
                                                      attn_implementation=attn, processor_args=config.processor_args)
        set_trainable(student, vision_tower=config.train_vision_tower, projector=config.train_projector)
    if processor is None:
        raise ValueError("build_trainer: a student passed in needs its processor")
    if spec_probe.needs_teacher:
        if teacher is None and config.teacher_sharding == "fsdp":
            teacher, teacher_processor = _load_teacher_for_sharding(config, t_dtype, attn)
        elif teacher is None:
            teacher, teacher_processor = load_model_and_processor(config.teacher, config.tiny_text_model,
                                                                  seed=config.seed + 1, dtype=t_dtype,
                                                                  attn_implementation=attn,
                                                                  processor_args=config.processor_args)
        check_tokenizers(teacher_processor if teacher_processor is not None else processor, processor,
                         vocab_size=min(lm_head(student)[0].shape[0], lm_head(teacher)[0].shape[0]))
        check_image_expansion(teacher, student)
    else:
        teacher = None
    if train_dataset is None:
        if items is None:
            items = load_items(config.data, config.image_folder, getattr(config, "synthetic_images", 200),
                               seed=config.seed, bad_samples=getattr(config, "bad_samples", "error"))
        train_dataset = EncodedDataset(items, processor, max_length=config.max_length)
    if teacher is not None:  # one encoding (the student's) and one set of position ids serve both models
        if teacher_processor is not None and items is not None:
            check_same_encoding(teacher_processor, processor, items)
        if len(train_dataset):
            check_same_positions(teacher, student, train_dataset[0])
    args = training_arguments(config, **args_overrides)
    if teacher is not None and config.teacher_sharding == "fsdp":
        if args.world_size <= 1:  # reading world_size sets up the processes
            raise ValueError("config teacher_sharding='fsdp' needs several processes (accelerate launch); with one "
                             "process use teacher_sharding='replicate'")
        shard_teacher(teacher, args.device)  # before IRS: its forwards run on the sharded teacher too
    layer = iva_layer
    if config.w_iva > 0 and layer is None:
        src_items = items if items is not None else getattr(train_dataset, "items", None)
        if src_items is None and config.iva_layer == "auto":
            raise ValueError("iva_layer='auto' needs the raw training items for calibration pairs")
        if config.iva_layer == "auto" and config.teacher_sharding == "replicate":
            teacher.to(args.device)  # IRS's calibration forwards run where training will
        layer = resolve_iva_layer(config, teacher, teacher_processor or processor, src_items or [],
                                  config.output_dir, is_main=args.should_save)
    module = build_module(config, student, teacher, processor, iva_layer=layer)
    tok = processor.tokenizer
    trainer = DistillTrainer(module, args=args, train_dataset=train_dataset,
                             data_collator=DistillCollator(tok.pad_token_id), processing_class=processor,
                             callbacks=callbacks)
    trainer.run_identity = ckpt.run_identity(config, args.world_size)
    return trainer


@contextlib.contextmanager
def _save_and_stop_on_sigterm(trainer: DistillTrainer):
    """While training, SIGTERM (what a scheduler sends a preempted job) makes the trainer save a
    checkpoint at the end of the current step and stop; afterwards the old handler is back."""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: trainer.request_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unset_deepspeed_config() -> None:
    """Forget the global DeepSpeed config that TrainingArguments made before the models are loaded
    register under DeepSpeed ZeRO-3: with it, ``from_pretrained`` would partition every model it
    loads (the frozen teacher included, which no DeepSpeed engine then gathers). build_trainer
    makes its own TrainingArguments after loading the models."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def run_distill(config, resume_from_checkpoint=None, resume_anyway: bool = False) -> dict:
    """Train as configured; save the final student to ``output_dir``; return the train metrics.

    ``resume_from_checkpoint``: a checkpoint folder, True (the last one in output_dir; none
    there: start from step 0), or None. It is verified (`verify_checkpoint`, on one process per
    node, `resolve_resume`) before any model is loaded; one written by a run with another
    teacher, data or world size is refused unless ``resume_anyway``. The metrics hold transformers' ``train_loss`` (the mean over the steps this
    call ran), ``first_step`` and ``global_step`` (the steps it ran), ``wall_s`` and
    ``log_history``. SIGTERM during training ends the current step with a checkpoint and returns
    early: the metrics then also hold ``stopped_by`` ("SIGTERM") and ``checkpoint`` (the folder),
    and the final student is not saved (the run is not finished).
    """
    args = training_arguments(config)  # sets up the processes (accelerate launch) before anything is read
    resume_from_checkpoint = resolve_resume(resume_from_checkpoint, config.output_dir, args,
                                            run=ckpt.run_identity(config, args.world_size), allow_changes=resume_anyway)
    should_save = args.should_save
    del args  # see _unset_deepspeed_config
    _unset_deepspeed_config()
    os.makedirs(config.output_dir, exist_ok=True)
    if should_save:
        save_config(config, os.path.join(config.output_dir, "distill_config.json"))
    trainer = build_trainer(config)
    t0 = time.time()
    with _save_and_stop_on_sigterm(trainer):
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint, verify=False)
    metrics = dict(result.metrics)
    if trainer.stop_requested and result.global_step < trainer.state.max_steps:
        metrics.update(stopped_by="SIGTERM", checkpoint=trainer.last_checkpoint)
    else:
        try:
            trainer.save_model(config.output_dir)
        except NonFiniteLossError:
            raise
        except Exception as e:  # noqa: BLE001 -- said in one line, the cause chained
            raise CheckpointError(f"could not save the final student to {config.output_dir}: "
                                  f"{ckpt.save_failure_reason(e, config.output_dir)}; the checkpoints are intact: "
                                  "fix that, then run again with --resume") from e
    metrics["wall_s"] = time.time() - t0
    # train_loss (transformers) is the mean over the steps this call ran, not over the run
    metrics["first_step"] = 1 + (ckpt.checkpoint_step(resume_from_checkpoint) if resume_from_checkpoint else 0)
    metrics["global_step"] = result.global_step
    metrics["log_history"] = trainer.state.log_history
    return metrics
