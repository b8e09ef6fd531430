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
