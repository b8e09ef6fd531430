"""The run configuration: defaults, YAML/JSON files, command-line overrides, clear errors."""
import json

import pytest

from align_ti.train.config import DistillConfig, field_names, load_config, save_config


def test_defaults_are_a_complete_run():
    cfg = load_config()
    assert cfg == DistillConfig()
    assert cfg.iva_layer == "auto" and cfg.teacher == "tiny-teacher"


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("w_tpa: 0.5\ndivergence: jsd\niva_k: 64\ntraining_args: {logging_steps: 3}\n")
    cfg = load_config(str(path), ["iva_layer=2", "bf16=true", "temperature=2", "iva_k=null", "iva_ratio=0.1"])
    assert cfg.w_tpa == 0.5 and cfg.divergence == "jsd"
    assert cfg.iva_layer == 2 and cfg.bf16 is True and cfg.temperature == 2.0
    assert cfg.iva_k is None and cfg.iva_ratio == 0.1
    assert cfg.training_args == {"logging_steps": 3}


def test_json_round_trip(tmp_path):
    cfg = load_config(overrides=["seed=7", 'training_args={"logging_steps": 1}'])
    path = tmp_path / "cfg.json"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert json.loads(path.read_text())["seed"] == 7


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*'w_kl'.*valid keys: .*w_kd"):
        load_config(overrides=["w_kl=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 1\n")
    with pytest.raises(ValueError, match="unknown config key.*'lr'.*learning_rate"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, match",
    [
        ("tpa_d=four", "tpa_d must be int"),
        ("divergence=kl", "divergence must be one of"),
        ("temperature=0", "temperature must be a finite number > 0"),
        ("learning_rate=inf", "learning_rate must be a finite number > 0"),
        ("w_sft=-1", "w_sft must be a finite number >= 0"),
        ("w_kd=nan", "w_kd must be a finite number >= 0"),
        ("num_train_epochs=-1", "num_train_epochs must be a finite number > 0"),
        ("tpa_fraction=1.5", "tpa_fraction"),
        ("iva_layer=best", "iva_layer"),
        ("teacher=/no/such/dir", "teacher.*local checkpoint"),
        ("data=/no/such.json", "data"),
        ("bf16=maybe", "bf16 must be bool"),
        ("kl_chunk_bytes=0", "kl_chunk_bytes must be a positive byte count"),
        ("kl_chunk_bytes=lots", "kl_chunk_bytes must be a positive byte count"),
        ("fp32_weight_grad=maybe", "fp32_weight_grad must be bool"),
        ("attn_implementation=flash", "attn_implementation must be one of"),
        ("max_steps", "key=value"),
    ],
)
def test_bad_values_say_what_to_fix(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=[override])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config("/no/such/config.yaml")


def test_all_weights_zero_rejected():
    with pytest.raises(ValueError, match="at least one"):
        load_config(overrides=["w_sft=0", "w_kd=0", "w_iva=0", "w_tpa=0"])


def test_field_names_cover_loss_weights():
    assert {"w_sft", "w_kd", "w_iva", "w_tpa", "iva_layer", "tpa_d", "seed"} <= set(field_names())


@pytest.mark.parametrize("suffix, text, kind", [
    (".json", '{"w_kd": 1,}', "JSON"),
    (".yaml", "w_kd: [1, 2\n", "YAML"),
])
def test_a_config_file_that_does_not_parse_is_named(tmp_path, suffix, text, kind):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}.*not valid {kind}"):
        load_config(str(path))


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="output_dir.*not a folder"):
        load_config(overrides=[f"output_dir={afile}"])


def test_epochs_only_matter_without_max_steps():
    assert load_config(overrides=["num_train_epochs=0", "max_steps=5"]).max_steps == 5
