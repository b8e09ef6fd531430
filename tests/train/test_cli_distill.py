"""`align-ti distill` and `align-ti demo`: help that explains itself, errors that say what to fix."""
import json

import pytest

from align_ti.cli import main


@pytest.mark.parametrize("command, words", [
    ("distill", ["--config", "key=value", "--resume", "w_sft", "checkpoint"]),
    ("demo", ["--quick", "--out", "SFT", "KD", "TPA", "Align-TI", "exact match", "paired tests"]),
])
def test_help_explains_itself(capsys, command, words):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for w in words:
        assert w in out, w


def test_top_level_help_lists_distill_and_demo(capsys):
    main([])
    out = capsys.readouterr().out
    assert "distill" in out and "demo" in out


def test_distill_missing_config_file(capsys):
    assert main(["distill", "--config", "/no/such/run.yaml"]) == 2
    err = capsys.readouterr().err
    assert "align-ti distill: error:" in err and "/no/such/run.yaml" in err and "does not exist" in err


def test_distill_missing_model_or_data_path(capsys):
    assert main(["distill", "student=/no/such/checkpoint"]) == 2
    assert "student" in capsys.readouterr().err
    assert main(["distill", "data=/no/such/data.json"]) == 2
    assert "data" in capsys.readouterr().err


def test_distill_unknown_key_lists_valid_keys(capsys, tmp_path):
    assert main(["distill", "w_kl=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key" in err and "'w_kl'" in err and "valid keys" in err and "w_kd" in err
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"lr": 0.1}))
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_distill_list_keys(capsys):
    assert main(["distill", "--list-keys"]) == 0
    keys = capsys.readouterr().out.split()
    assert {"w_sft", "w_kd", "w_iva", "w_tpa", "iva_layer", "tpa_d"} <= set(keys)


def test_distill_incompatible_tokenizers(capsys, tmp_path):
    """A teacher checkpoint whose tokenizer maps shared ids to other tokens is refused."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    from align_ti.models.tiny import build_processor, build_tiny_llava
    from align_ti.models.tokenizer import _raw_tokenizer_json

    raw = json.loads(_raw_tokenizer_json())
    vocab = raw["model"]["vocab"]
    vocab["Ġred"], vocab["Ġblue"] = vocab["Ġblue"], vocab["Ġred"]
    good = build_processor().tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)), pad_token=good.pad_token,
                                  eos_token=good.eos_token, chat_template=good.chat_template)
    teacher = build_tiny_llava("teacher")
    processor = build_processor(tokenizer=tok, config=teacher.config)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert main(["distill", f"teacher={folder}", "max_steps=1", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "incompatible tokenizers" in err and "Ġred" in err


def test_demo_bad_arguments(capsys):
    assert main(["demo", "--methods", "SFT,DPO"]) == 2
    assert "DPO" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0"]) == 2
    assert main(["demo", "--threads", "-1"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_unknown_flag_shows_the_subcommand_usage(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["distill", "--bogus"])
    err = capsys.readouterr().err
    assert "usage: align-ti distill" in err and "unrecognized arguments: --bogus" in err


def test_distill_malformed_data_file_names_it(capsys, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"foo": 1}]))
    assert main(["distill", f"data={data}", "max_steps=1", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "sample 0" in err and "conversations" in err


def test_distill_resume_says_where_it_starts(capsys, tmp_path):
    """--resume without a checkpoint says it starts from step 0; with one, where it resumes;
    the summary line names the steps its train_loss averages."""
    run = tmp_path / "run"
    args = ["distill", f"output_dir={run}", "per_device_train_batch_size=2", "synthetic_images=2",
            "w_iva=0", "w_tpa=0", 'training_args={"save_steps": 2, "disable_tqdm": true}']
    assert main(args + ["--resume", "max_steps=2"]) == 0
    cap = capsys.readouterr()
    assert "no checkpoint-<step>" in cap.err and "starting from step 0" in cap.err
    assert "(mean over steps 1-2)" in cap.out
    assert main(args + ["--resume", "max_steps=3"]) == 0
    cap = capsys.readouterr()
    assert f"resuming from {run / 'checkpoint-2'}" in cap.err
    assert "(mean over steps 3-3)" in cap.out


def test_distill_missing_image_names_file_and_sample(capsys, tmp_path):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--images", "2"]) == 0
    (data / "images" / "train-0-00001.png").unlink()
    capsys.readouterr()
    assert main(["distill", f"data={data / 'train.json'}", "max_steps=1", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"align-ti distill: error: {data / 'train.json'}: sample 4 (id 'train-0-00001-q0'): "
                   f"image file {str(data / 'images' / 'train-0-00001.png')!r} does not exist"]
