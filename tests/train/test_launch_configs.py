"""The ready-made launch configs in configs/ (README, "Several processes"): each is read by
accelerate's own launcher code (what `accelerate launch --config_file FILE` does, short of
starting processes), gives the engine it is named for, and fits the distillation module; the
DeepSpeed JSON is completed from a run's TrainingArguments by transformers; README shows one
command per config."""
import json
import os
import re

import pytest

from tests.utils import ROOT, accelerate_has_fsdp2, accelerate_launch_env

CONFIGS = os.path.join(ROOT, "configs", "accelerate")
# file -> (engine, nodes)
EXPECTED = {
    "ddp.yaml": ("ddp", 1), "fsdp2.yaml": ("fsdp2", 1), "zero3.yaml": ("zero3", 1),
    "multinode-ddp.yaml": ("ddp", 2), "multinode-fsdp2.yaml": ("fsdp2", 2), "multinode-zero3.yaml": ("zero3", 2),
}


def test_every_config_is_tested():
    assert sorted(os.listdir(CONFIGS)) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_reads_the_config_as_its_engine(name):
    engine, nodes = EXPECTED[name]
    if engine == "fsdp2" and not accelerate_has_fsdp2():
        pytest.skip("accelerate < 1.6 has no FSDP2")
    args, env = accelerate_launch_env(f"configs/accelerate/{name}")
    assert args.num_machines == nodes and args.num_processes % nodes == 0 and args.num_processes >= 2 * nodes
    if nodes > 1:
        assert args.main_process_port and args.main_process_ip and args.rdzv_backend == "static"
    assert bool(args.use_fsdp) == (engine == "fsdp2") and bool(args.use_deepspeed) == (engine == "zero3")
    if engine == "ddp":
        assert args.multi_gpu
    if engine == "fsdp2":
        assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    if engine == "zero3":
        path = os.path.join(ROOT, env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])  # relative to the repo root
        with open(path) as f:
            assert json.load(f)["zero_optimization"]["stage"] == 3


@pytest.mark.skipif(not accelerate_has_fsdp2(), reason="accelerate < 1.6 has no FSDP2")
def test_the_fsdp2_config_makes_each_language_model_layer_a_unit(tiny, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from tests.utils import dist_module

    _, env = accelerate_launch_env("configs/accelerate/fsdp2.yaml")
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    module, _ = dist_module(tiny)
    plugin.set_auto_wrap_policy(module)
    wrapped = {type(m).__name__ for m in module.modules() if plugin.auto_wrap_policy(m, False, 0)}
    # not the vision layers: a micro-batch without images skips them (sharding.layer_classes)
    assert wrapped == {"Qwen2DecoderLayer"}, wrapped


def test_the_zero3_json_is_completed_from_the_run(tiny, tmp_path):
    """Every "auto" of the JSON is filled from TrainingArguments, for the distillation module
    (which has no model config for the hidden-size based entries: the JSON leaves them out)."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from tests.utils import dist_module

    module, _ = dist_module(tiny)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=2e-5, max_grad_norm=0.5, use_cpu=True, report_to=[])
    ds = HfTrainerDeepSpeedConfig(os.path.join(ROOT, "configs", "deepspeed", "zero3.json"))
    ds.trainer_config_process(args)
    ds.trainer_config_finalize(args, module, num_training_steps=10)
    assert ds.is_zero3() and "auto" not in json.dumps(ds.config)
    assert (ds.config["train_micro_batch_size_per_gpu"], ds.config["gradient_accumulation_steps"],
            ds.config["gradient_clipping"]) == (4, 2, 0.5)


def test_readme_shows_one_command_per_config():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("### Several processes", 1)[1].split("\n## ", 1)[0]
    for name in EXPECTED:
        assert re.search(rf"accelerate launch --config_file configs/accelerate/{re.escape(name)}\b", section), name
