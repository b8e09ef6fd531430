"""Filesystem faults at the command line, for real: every `align-ti` subcommand given an output
folder it cannot create or write exits 2 with one `error:` line naming the flag or key and the
OS reason, before it loads a model, and never with a traceback.

CI runs as root, which ignores permission bits, so the unwritable folders are ones that refuse
root too: a read-only tmpfs mount, a path under a regular file, /proc/... and /sys/...; and a
write failure injected at the OS call after the folder checked out fine.
"""
import errno
import os
import subprocess
import sys

import pytest

from align_ti.cli import main
from align_ti.paths import ensure_writable_dir

# subcommand -> how its output folder is given (argv or environment) and the name errors use
COMMANDS = {
    "synth": (lambda p: (["synth", "--out", p], {}), "--out"),
    "irs": (lambda p: (["irs", "--out", p], {}), "--out"),
    "demo": (lambda p: (["demo", "--quick", "--out", p], {}), "--out"),
    "bench": (lambda p: (["bench", "--device", "cpu", "--op", "attention_mass", "--quick", "--out", p], {}),
              "--out"),
    "distill": (lambda p: (["distill", f"output_dir={p}", "max_steps=1"], {}), "output_dir"),
    "build-native": (lambda p: (["build-native"], {"ALIGN_TI_NATIVE_DIR": p}),
                     "native cache folder ($ALIGN_TI_NATIVE_DIR)"),
}


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A read-only tmpfs mount (chmod does not stop root); skipped where mounting is not allowed."""
    path = tmp_path_factory.mktemp("ro")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("a read-only folder for root needs a read-only mount, and mounting is not allowed "
                    f"here: {(proc.stderr or proc.stdout).strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="module")
def regular_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("file") / "regular"
    path.write_text("not a folder")
    return str(path)


# (case name, path maker, words of the OS reason)
PATHS = [
    ("read-only folder", lambda ro, f: ro, "Read-only file system"),
    ("under a read-only folder", lambda ro, f: os.path.join(ro, "sub"), "Read-only file system"),
    ("under a regular file", lambda ro, f: os.path.join(f, "sub"), "Not a directory"),
    ("/proc", lambda ro, f: "/proc/align-ti-out", "No such file or directory"),
    ("/sys", lambda ro, f: "/sys/align-ti-out", "not permitted"),
]


def _check_error(err: str, command: str, name: str, reason: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"align-ti {command}: error: {name} "), err
    assert reason in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case, make_path, reason", PATHS, ids=[p[0] for p in PATHS])
def test_unwritable_output_folder_is_one_line_error(command, case, make_path, reason, capsys, monkeypatch, request):
    ro = request.getfixturevalue("read_only_dir") if "read-only" in case else None
    path = make_path(ro, request.getfixturevalue("regular_file"))
    build, name = COMMANDS[command]
    argv, env = build(path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import align_ti.models.tiny as tiny

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the output folder was checked")

    monkeypatch.setattr(tiny, "build_tiny_llava", no_model)
    assert main(argv) == 2
    _check_error(capsys.readouterr().err, command, name, reason)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unwritable_output_folder_exit_code_without_traceback(command, read_only_dir):
    """The real process: exit status 2 and one error line on stderr."""
    build, name = COMMANDS[command]
    argv, env = build(os.path.join(read_only_dir, "sub"))
    proc = subprocess.run([sys.executable, "-m", "align_ti.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    _check_error(proc.stderr, command, name, "Read-only file system")


def test_synth_write_failure_after_the_check(tmp_path, capsys, monkeypatch):
    """The folder was writable, then the disk filled up: one line naming --out, exit 2."""
    from PIL import Image

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert main(["synth", "--out", str(tmp_path / "data"), "--images", "1"]) == 2
    _check_error(capsys.readouterr().err, "synth", "--out", "No space left on device")


def test_ensure_writable_dir_creates_and_leaves_nothing(tmp_path, regular_file):
    target = tmp_path / "a" / "b"
    assert ensure_writable_dir(target, "--out") == str(target)
    assert target.is_dir() and list(target.iterdir()) == []
    assert ensure_writable_dir(str(target), "--out") == str(target)  # an existing folder is fine
    with pytest.raises(ValueError, match=r"^output_dir '.*regular': exists and is not a folder$"):
        ensure_writable_dir(regular_file, "output_dir")
    with pytest.raises(ValueError, match=r"Not a directory \('.*regular' is a file\)"):
        ensure_writable_dir(os.path.join(regular_file, "x", "y"), "output_dir")
