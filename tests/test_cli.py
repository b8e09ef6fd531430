"""The `align-ti` command line: help lists the real subcommands; each runs."""
import json
import subprocess
import sys

from align_ti.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in ("env", "synth"):
        assert name in out


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] and "cuda_available" in info
    assert info["native_cpu_kernel"]  # its path, or why it is not there


def test_synth_writes_llava_json(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--images", "3"]) == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    records = json.loads(files[0].read_text())
    assert records and "<image>" in records[0]["conversations"][0]["value"]
    assert (tmp_path / records[0]["image"]).exists()


def test_console_entry_point_help_is_fast():
    # `python -m align_ti.cli --help` must not import torch/triton to answer.
    code = "import sys; from align_ti.cli import main; main(['--help'])"
    out = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert "synth" in out.stdout
    check = subprocess.run(
        [sys.executable, "-c", "import align_ti, align_ti.cli, sys; print('torch' in sys.modules)"],
        capture_output=True, text=True,
    )
    assert check.stdout.strip() == "False"


def test_irs_data_with_missing_images_is_one_line_error(tmp_path, capsys, monkeypatch):
    """JSONL and LLaVA JSON alike: exit 2 naming the image file and the sample, before a model loads."""
    import align_ti.models.tiny as tiny

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data was read")

    monkeypatch.setattr(tiny, "build_tiny_llava", no_model)
    (tmp_path / "calib.jsonl").write_text('{"image": "gone.png", "instructions": ["a?", "b?"]}\n')
    json_path = tmp_path / "llava" / "train.json"
    main(["synth", "--out", str(json_path.parent), "--images", "1"])
    (json_path.parent / "images" / "train-0-00000.png").unlink()
    capsys.readouterr()
    for data, sample, image in [(tmp_path / "calib.jsonl", f"{tmp_path / 'calib.jsonl'}:1", tmp_path / "gone.png"),
                                (json_path, f"{json_path}: sample 0 (id 'train-0-00000-q0')",
                                 json_path.parent / "images" / "train-0-00000.png")]:
        assert main(["irs", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"align-ti irs: error: {'data: ' if data.suffix == '.jsonl' else ''}{sample}: "
                       f"image file {str(image)!r} does not exist"]
