"""Checkpoint folders without a model (align_ti.train.checkpoint), and what a save refuses.

- publish: a kill while the older copy of a re-saved step is deleted, or between the two
  renames, never leaves the run without that checkpoint; `clean_staging` puts a complete staged
  copy in place instead of deleting it, and removes partial ones.
- A manifest that parses but holds other types than written (``"crc32": null``, ``"run": "x"``,
  a bad ``block_bytes``) is a damaged manifest (one line naming it), and the manifest's own block
  size is the one its checksums are checked with.
- The run identity sees another image folder or bad_samples rule; the IRS cache and the manifest
  fingerprint a teacher folder the same way (by content: a copy saved again matches).
- A save writes a -inf parameter (a vocabulary mask) and refuses NaN / +inf.
"""
import json
import os
import shutil

import pytest
import torch

from align_ti.train import checkpoint as ckpt
from align_ti.train.checkpoint import CheckpointError


class Killed(BaseException):
    """Stands in for a kill (not an Exception: no error handling catches it)."""


def _sealed(folder, payload: bytes, step: int = 4, run=None) -> str:
    """A checkpoint-like folder with a weight file and a trainer state, sealed (manifest)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(payload)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"step": step}, f)
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)
    ckpt.seal(str(folder), step, run)
    return str(folder)


def _resave(tmp_path):
    """A run folder with checkpoint-4 (old contents) and a sealed staged re-save of step 4."""
    run_dir = tmp_path / "run"
    dst = _sealed(run_dir / "checkpoint-4", b"old" * 1000)
    staged = _sealed(run_dir / ckpt.STAGING / "checkpoint-4", b"new" * 1000)
    return str(run_dir), staged, dst


def _weights(folder) -> bytes:
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return f.read()


def test_a_kill_while_the_old_copy_is_deleted_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    run_dir, staged, dst = _resave(tmp_path)
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):
        if str(path).endswith(".old") and os.path.exists(path):
            raise Killed("killed while deleting the older copy")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(Killed):
        ckpt.publish(staged, dst)
    monkeypatch.undo()
    assert _weights(dst) == b"new" * 1000  # the new copy is in place before the old one goes
    assert ckpt.clean_staging(run_dir) == []  # the leftover .old copy is removed, nothing else
    assert not os.path.exists(os.path.join(run_dir, ckpt.STAGING))
    assert ckpt.verify_checkpoint(dst)["step"] == 4 and _weights(dst) == b"new" * 1000


def test_a_kill_between_the_two_renames_is_repaired_by_clean_staging(tmp_path, monkeypatch):
    run_dir, staged, dst = _resave(tmp_path)
    real_replace = os.replace
    calls = []

    def killed_replace(src, target):
        calls.append(src)
        if len(calls) == 2:  # dst -> .old done, staged -> dst not yet
            raise Killed("killed between the renames")
        return real_replace(src, target)

    monkeypatch.setattr(ckpt.os, "replace", killed_replace)
    with pytest.raises(Killed):
        ckpt.publish(staged, dst)
    monkeypatch.undo()
    assert not os.path.exists(dst)  # the one moment without checkpoint-4 ...
    assert ckpt.clean_staging(run_dir) == [dst]  # ... and the complete staged copy is put in place
    assert _weights(dst) == b"new" * 1000 and ckpt.verify_checkpoint(dst)["step"] == 4
    assert not os.path.exists(os.path.join(run_dir, ckpt.STAGING))


def test_clean_staging_removes_partial_and_superseded_copies(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    dst = _sealed(run_dir / "checkpoint-2", b"a" * 10, step=2)
    _sealed(run_dir / ckpt.STAGING / "checkpoint-2", b"b" * 10, step=2)  # published already: stale
    partial = run_dir / ckpt.STAGING / "checkpoint-6"
    monkeypatch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(Killed("killed in seal")))
    with pytest.raises(Killed):
        _sealed(partial, b"c" * 10, step=6)  # killed before its manifest was renamed into place
    monkeypatch.undo()
    assert not ckpt.is_sealed(str(partial))
    assert ckpt.clean_staging(str(run_dir)) == []
    assert sorted(os.listdir(run_dir)) == ["checkpoint-2"] and _weights(dst) == b"a" * 10


def _rewrite_manifest(folder, change) -> None:
    path = os.path.join(folder, ckpt.MANIFEST_NAME)
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _set_files(key, value):
    def change(m):
        for meta in m["files"].values():
            meta[key] = value
    return change


@pytest.mark.parametrize("change, says", [
    (_set_files("crc32", None), "crc32: str"),
    (_set_files("size", "12"), "size: int"),
    (lambda m: m.update(run="x"), "run is str"),
    (lambda m: m.update(run={"teacher": "x"}), "run.teacher"),
    (lambda m: m.update(block_bytes="64M"), "block_bytes '64M'"),
    (lambda m: m.update(block_bytes=0), "block_bytes 0"),
    (lambda m: m.update(block_bytes=16), "checksums for"),  # 1 checksum for 3000 bytes in 16-byte blocks
    (lambda m: m.update(files=[]), "files is list"),
    (lambda m: m.clear() or m.update(format=1), "block_bytes None"),
])
def test_a_wrongly_typed_manifest_is_a_damaged_manifest(tmp_path, change, says):
    folder = _sealed(tmp_path / "checkpoint-4", b"w" * 3000)
    _rewrite_manifest(folder, change)
    with pytest.raises(CheckpointError) as e:
        ckpt.verify_checkpoint(folder, run=None)
    message = str(e.value)
    assert "\n" not in message and f"{ckpt.MANIFEST_NAME} is damaged" in message and says in message, message


def test_the_manifest_block_size_is_the_one_checked(tmp_path):
    folder = _sealed(tmp_path / "checkpoint-4", bytes(range(256)) * 12)

    def small_blocks(m):  # as a writer with 1 KiB blocks would have written it
        m["block_bytes"] = 1024
        crcs = ckpt._block_crcs(folder, {rel: meta["size"] for rel, meta in m["files"].items()}, 1024)
        for rel, meta in m["files"].items():
            meta["crc32"] = " ".join(crcs[rel])

    _rewrite_manifest(folder, small_blocks)
    assert ckpt.verify_checkpoint(folder)["block_bytes"] == 1024
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.seek(2500)
        f.write(b"\xff")
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match its checksum \(bytes 2048-3072\)"):
        ckpt.verify_checkpoint(folder)


def _llava_config(tmp_path, **overrides):
    from align_ti.train.config import load_config

    data = tmp_path / "data.json"
    if not data.exists():
        data.write_text("[]")
    over = {"data": str(data), "output_dir": str(tmp_path / "out"), **overrides}
    return load_config(overrides=[f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("key, value", [("image_folder", "/elsewhere/images"), ("bad_samples", "skip")])
def test_another_image_folder_or_bad_samples_rule_is_another_run(tmp_path, key, value):
    folder = _sealed(tmp_path / "checkpoint-4", b"w" * 10, run=ckpt.run_identity(_llava_config(tmp_path), 1))
    other = ckpt.run_identity(_llava_config(tmp_path, **{key: value}), 1)
    with pytest.raises(CheckpointError, match=f"written by another run \\({key} "):
        ckpt.verify_checkpoint(folder, run=other)
    assert ckpt.verify_checkpoint(folder, run=ckpt.run_identity(_llava_config(tmp_path), 1)) is not None


def test_the_irs_cache_fingerprints_a_teacher_folder_by_content(tiny, tmp_path, monkeypatch):
    """One fingerprint of a model folder (`checkpoint.folder_digest`): the IRS cache holds for the
    same teacher saved again (new mtimes), not for another teacher at the same path."""
    import copy
    import time

    import align_ti.models.irs as irs
    from align_ti.data.synthetic import synthetic_vqa
    from align_ti.train.build import resolve_iva_layer

    calls = []
    monkeypatch.setattr(irs, "irs_scores", lambda model, proc, pairs: calls.append(1) or irs.IRSResult(
        scores=[0.1, 0.5], layer=1, num_pairs=len(pairs), cos_std=[0.0, 0.0]))
    folder = tmp_path / "teacher"
    tiny.teacher.save_pretrained(folder)
    cfg = _llava_config(tmp_path, teacher=str(folder), iva_layer="auto", irs_samples=4)
    items = synthetic_vqa("train", 2, seed=0, questions_per_image=2)
    assert resolve_iva_layer(cfg, tiny.teacher, tiny.processor, items, str(tmp_path)) == 1
    time.sleep(1.1)  # the mtime the old fingerprint keyed on
    tiny.teacher.save_pretrained(folder)
    resolve_iva_layer(cfg, tiny.teacher, tiny.processor, items, str(tmp_path))
    assert len(calls) == 1, "the same teacher saved again is another teacher to the cache"
    other = copy.deepcopy(tiny.teacher)
    with torch.no_grad():
        other.get_output_embeddings().weight.add_(1.0)
    other.save_pretrained(folder)
    resolve_iva_layer(cfg, other, tiny.processor, items, str(tmp_path))
    assert len(calls) == 2


def test_a_save_writes_minus_inf_and_refuses_plus_inf(tiny, tmp_path):
    """-inf masks a vocabulary column in the fused ops (e.g. in an LM-head bias): a student that
    holds it must be savable; NaN and +inf are divergence and never written."""
    import copy

    from safetensors.torch import load_file

    from align_ti.train.build import build_trainer
    from align_ti.train.loss import NonFiniteLossError
    from tests.utils import run_config

    cfg = run_config(tmp_path / "run", w_iva=0, w_tpa=0)
    trainer = build_trainer(cfg, student=copy.deepcopy(tiny.student), teacher=tiny.teacher, processor=tiny.processor,
                            teacher_processor=tiny.processor, train_dataset=tiny.dataset)
    name = "model.language_model.layers.0.self_attn.q_proj.bias"
    param = dict(trainer.model.student.named_parameters())[name]
    with torch.no_grad():
        param[0] = float("-inf")
    trainer.save_model(str(tmp_path / "masked"))
    saved = load_file(str(tmp_path / "masked" / "model.safetensors"))  # keys in the checkpoint's format
    [bias] = [v for k, v in saved.items() if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.bias")]
    assert bias[0] == float("-inf") and torch.isfinite(bias[1:]).all()
    for value in (float("inf"), float("nan")):
        with torch.no_grad():
            param[1] = value
        with pytest.raises(NonFiniteLossError, match=f"parameter {name} holds NaN or inf; it is not saved"):
            trainer.save_model(str(tmp_path / f"bad{value}"))
        assert not (tmp_path / f"bad{value}").exists()
