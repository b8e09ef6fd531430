"""The thin distillation trainer (imported lazily: `import align_ti.train` stays light).

- `DistillConfig`, `load_config`: the one run configuration (`align_ti.train.config`).
- `LossSpec`, `DistillModule`, `NonFiniteLossError`: the loss and the wrapper whose forward
  computes it (`align_ti.train.loss`).
- `DistillTrainer`: the `transformers.Trainer` subclass (`align_ti.train.trainer`); its
  checkpoints: `align_ti.train.checkpoint`.
- `build_trainer`, `run_distill`, `resolve_iva_layer`: a run from a config
  (`align_ti.train.build`).
- `EncodedDataset`, `DistillCollator`, `check_tokenizers`, `load_model_and_processor`: data
  and model glue (`align_ti.train.data`).
- `run_demo`, `DemoSettings`: the `align-ti demo` (`align_ti.train.demo`).
"""
from __future__ import annotations

from align_ti._lazy import lazy_exports


_LAZY = {
    "DistillConfig": "align_ti.train.config",
    "load_config": "align_ti.train.config",
    "save_config": "align_ti.train.config",
    "build_trainer": "align_ti.train.build",
    "run_distill": "align_ti.train.build",
    "resolve_iva_layer": "align_ti.train.build",
    "DistillTrainer": "align_ti.train.trainer",
    "DistillModule": "align_ti.train.loss",
    "LossSpec": "align_ti.train.loss",
    "NonFiniteLossError": "align_ti.train.loss",
    "EncodedDataset": "align_ti.train.data",
    "DistillCollator": "align_ti.train.data",
    "TokenizerMismatchError": "align_ti.train.data",
    "check_tokenizers": "align_ti.train.data",
    "load_model_and_processor": "align_ti.train.data",
    "run_demo": "align_ti.train.demo",
    "DemoSettings": "align_ti.train.demo",
}


__getattr__, __dir__ = lazy_exports("align_ti.train", _LAZY, globals())


__all__ = list(_LAZY)
