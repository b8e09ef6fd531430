"""Checkpoint folders a resume can trust: staged, manifested, verified.

A save writes ``<output_dir>/.staging/checkpoint-<step>``, adds a manifest, fsyncs the folder and
renames it to ``<output_dir>/checkpoint-<step>`` (atomic): a run killed while saving leaves no
half-written ``checkpoint-*`` (transformers' ``get_last_checkpoint`` and rotation only look at
``checkpoint-<n>`` folders and ignore extra files in them). The manifest is renamed into place
last, so a staged folder with one is complete; re-saving a step moves the older copy aside,
renames the new one in, fsyncs and only then deletes the older one, and `clean_staging` (before
a save or a resume) publishes a complete staged copy whose published folder is missing instead
of deleting it.

The manifest (``align_ti_manifest.json``, written last, inside the staged folder) records every
file of the folder -- sharded subfolders and every process's RNG file included -- with its size
and the CRC-32 of each 64 MiB block, plus what the run was: its teacher, data and world size.
``verify_checkpoint`` checks all of it before a resume loads anything, and names the damaged,
missing or foreign file, the checkpoint folder and the newest intact checkpoint to resume from
instead. A checkpoint without a manifest (written before it existed) still resumes, with a
warning, after the checks that need no manifest (config.json present, trainer_state.json
readable).

Why CRC-32 of every block, not a sampled hash: a few KiB of garbage anywhere in a weight file
must be found, and only a full pass finds it. ``zlib.crc32`` is the fastest full hash in the
standard library (2.3-2.4 GB/s per core on this 2-core VM, against ~1 GB/s for blake2b, sha1
and sha256; xxhash is not installed) and releases the GIL, so a thread pool hashes the blocks
of all files at once, reading back the page cache the save just filled: 3.2-3.5 GB/s with two
threads for a 1.6 GB folder (a 128M-parameter fp32 model with Adam). `seal` runs that next to
the folder's fsync, which a save needs anyway and which takes longer (0.7-0.8 s for that
folder), so the save took 1.8-2.6 s with the manifest against 1.7-6.0 s without (median of
4 alternating runs: 1.96 s vs 2.17 s, i.e. within the noise). For a 2B student with Adam
(~24 GB): ~7 s of hashing on two threads, hidden behind ~11 s of fsync, in a save of ~25-80 s;
verifying before a resume reads it once more (~7 s). CRC-32 detects damage, not tampering,
which is what a resume needs.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

__all__ = [
    "CheckpointError",
    "MANIFEST_NAME",
    "STAGING",
    "checkpoint_problem",
    "checkpoint_step",
    "checkpoints",
    "clean_staging",
    "folder_digest",
    "fsync_tree",
    "is_full_disk",
    "is_sealed",
    "loading",
    "publish",
    "remove_staged",
    "run_identity",
    "save_failure_reason",
    "seal",
    "verify_checkpoint",
    "write_manifest",
]

MANIFEST_NAME = "align_ti_manifest.json"
STAGING = ".staging"
_FORMAT = 1
_BLOCK = 64 << 20        # one CRC per block: blocks hash in parallel and a mismatch names its bytes
_READ = 8 << 20          # read size inside a block
_SAMPLE = 1 << 20        # head and tail bytes of each file in a model folder's fingerprint
_FULL_DISK = 64 << 20    # a failed save with less than this free is reported as a full disk


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or resumed from; the message names the folder and the file."""


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------

def _crc(path: str, offset: int, length: int) -> int:
    """CRC-32 of ``length`` bytes of ``path`` from ``offset`` (fewer if the file is shorter)."""
    crc = 0
    buf = memoryview(bytearray(min(_READ, max(length, 1))))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(buf[:min(length, len(buf))])
            if not n:
                break
            crc = zlib.crc32(buf[:n], crc)
            length -= n
    return crc


def _threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _block_count(size: int, block: int) -> int:
    return max(1, -(-size // block))


def _block_crcs(folder: str, sizes: dict[str, int], block: int = _BLOCK) -> dict[str, list[str]]:
    """{relative path: [CRC-32 of each ``block``-byte block, 8 hex digits]} for files of known
    size. The manifest stores each list as one space-separated string."""
    jobs = [(rel, off) for rel, size in sizes.items() for off in range(0, max(size, 1), block)]
    with ThreadPoolExecutor(_threads()) as pool:
        crcs = pool.map(lambda job: _crc(os.path.join(folder, job[0]), job[1], block), jobs)
        out: dict[str, list[str]] = {rel: [] for rel in sizes}
        for (rel, _off), crc in zip(jobs, crcs):
            out[rel].append(f"{crc:08x}")
    return out


def _files(folder: str) -> dict[str, int]:
    """{path relative to folder, with '/': size} of every regular file below it but the manifest."""
    sizes = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel != MANIFEST_NAME and os.path.isfile(path):
                sizes[rel] = os.path.getsize(path)
    return sizes


# --------------------------------------------------------------------------------------------
# what the run is: teacher, data, world size
# --------------------------------------------------------------------------------------------

def folder_digest(path: str) -> str:
    """Name, size and the CRC-32 of the first and last MiB of each file of a model folder: another
    teacher differs (also one saved again at the same path), the same teacher copied or moved
    elsewhere does not. The one fingerprint of a model folder: the manifest's run identity and
    the IRS cache key (`align_ti.train.build.resolve_iva_layer`) both use it."""
    parts = []
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            size = os.path.getsize(file)
            parts.append([name, size, _crc(file, 0, _SAMPLE), _crc(file, max(0, size - _SAMPLE), _SAMPLE)])
    return f"{zlib.crc32(json.dumps(parts).encode()):08x}"


def run_identity(config, world_size: int) -> dict:
    """What a checkpoint must share with the run that resumes from it: the teacher (a built-in
    one by name, text model and seed; a folder by its files' content), the data (synthetic by
    size and seed; a file by its content, its image folder by path and the bad_samples rule,
    which decides which samples train) and the number of processes."""
    if os.path.isdir(config.teacher):
        teacher = {"name": os.path.abspath(config.teacher), "digest": folder_digest(config.teacher)}
    else:  # built-in: build_trainer seeds the teacher with seed + 1
        name = f"{config.teacher} ({config.tiny_text_model}, seed {config.seed + 1})"
        teacher = {"name": name, "digest": name}
    if os.path.isfile(config.data):
        size = os.path.getsize(config.data)
        images = os.path.abspath(config.image_folder or os.path.dirname(os.path.abspath(config.data)))
        data = {"name": os.path.abspath(config.data), "digest": f"{size}:{_crc(config.data, 0, size):08x}",
                "image_folder": images, "bad_samples": config.bad_samples}
    else:
        name = f"{config.data} ({config.synthetic_images} images, seed {config.seed})"
        data = {"name": name, "digest": name}
    return {"teacher": teacher, "data": data, "world_size": int(world_size)}


def _run_changes(saved: Optional[dict], current: Optional[dict]) -> list[str]:
    if not saved or not current:
        return []
    changes = []
    for key in ("teacher", "data"):
        old, new = saved.get(key), current.get(key)
        if old and new and old["digest"] != new["digest"]:
            changes.append(f"{key} {old['name']!r} -> {new['name']!r}" if old["name"] != new["name"]
                           else f"{key} {new['name']!r} has other contents now")
        for part in ("image_folder", "bad_samples"):  # absent from manifests before they were recorded
            if old and new and part in old and old[part] != new.get(part):
                changes.append(f"{part} {old[part]!r} -> {new.get(part)!r}")
    if saved.get("world_size") != current.get("world_size"):
        changes.append(f"world size {saved.get('world_size')} -> {current.get('world_size')}")
    return changes


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def write_manifest(folder: str, step: int, run: Optional[dict]) -> str:
    """Record size and block CRCs of every file of a staged checkpoint folder, and the run, in
    ``<MANIFEST_NAME>.tmp``; return its path (`seal` renames it into place once the files are on
    disk, so that a folder with a manifest is complete)."""
    sizes = _files(folder)
    crcs = _block_crcs(folder, sizes)
    manifest = {"format": _FORMAT, "step": int(step), "block_bytes": _BLOCK, "run": run,
                "files": {rel: {"size": sizes[rel], "crc32": " ".join(crcs[rel])} for rel in sizes}}
    tmp = os.path.join(folder, MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return tmp


def seal(folder: str, step: int, run: Optional[dict]) -> None:
    """Write the manifest of a staged checkpoint folder and fsync the folder. The files' fsync
    (disk-bound) runs alongside the hashing (CPU-bound, reading the page cache), so the manifest
    adds little to a save's time. The manifest is renamed into place last: a staged folder with
    a manifest is complete (`clean_staging` relies on it)."""
    with ThreadPoolExecutor(1) as pool:
        synced = pool.submit(fsync_tree, folder)
        tmp = write_manifest(folder, step, run)
        synced.result()
    _fsync_file(tmp)
    os.replace(tmp, os.path.join(folder, MANIFEST_NAME))
    _fsync_dir(folder)


def fsync_tree(path: str) -> None:
    """fsync every file below path and the folders."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            _fsync_file(os.path.join(root, f))
        _fsync_dir(root)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staged: str, dst: str) -> None:
    """Rename a complete (sealed) staged folder to ``dst``, replacing an older save of the same
    step. The older copy is moved aside and deleted only once the new one is in place (and the
    run folder fsynced): at every moment ``dst`` or a sealed copy in the staging folder exists,
    and `clean_staging` puts the latter in place if a kill came between the two renames."""
    run_dir = os.path.dirname(dst)
    old = None
    if os.path.exists(dst):  # re-saving a step
        old = staged + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(staged, dst)
    _fsync_dir(run_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(staged))  # the staging folder, only when empty


def is_sealed(folder: str) -> bool:
    """Whether a staged folder is complete: `seal` renames its manifest into place last."""
    return os.path.isfile(os.path.join(folder, MANIFEST_NAME))


def clean_staging(run_dir: str) -> list[str]:
    """Clear what killed saves left in ``<run_dir>/.staging``, never losing a checkpoint: a sealed
    ``checkpoint-<step>`` whose published folder is missing (a kill between `publish`'s two
    renames) is published; everything else (partial folders, a ``.old`` copy of a published
    checkpoint) is removed. Call it on one process, before a save or a resume looks for
    checkpoints. Returns the folders it published."""
    staging = os.path.join(run_dir, STAGING)
    published = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(staging)):
            path, dst = os.path.join(staging, name), os.path.join(run_dir, name)
            if _is_checkpoint_name(name) and is_sealed(path) and not os.path.exists(dst):
                os.replace(path, dst)
                _fsync_dir(run_dir)
                published.append(dst)
            else:
                shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(staging)
    return published


def remove_staged(staged: str) -> None:
    """Remove the staged folder of a save that failed (never sealed), and the staging folder when
    nothing else is in it."""
    shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(staged))


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def is_full_disk(reason: str) -> bool:
    """Whether a `save_failure_reason` is a full disk or quota."""
    return reason.startswith(("no space left", "disk quota exceeded"))


def save_failure_reason(error: BaseException, folder: str) -> str:
    """Why a save failed, in words: a full disk is named as such even when the writer's error
    does not say so (torch.save reports ENOSPC as 'unexpected pos ...'). Call it before the
    partial files are removed, so the free space is the space the save left."""
    e: Optional[BaseException] = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left" if e.errno == errno.ENOSPC else "disk quota exceeded"
            return f"{what} on {folder}"
        e = e.__cause__ or e.__context__
    free = _free_bytes(folder)
    if "No space left" in str(error) or (free is not None and free < _FULL_DISK):
        return f"no space left on {folder} ({free} bytes free)" if free is not None else f"no space left on {folder}"
    return _brief(error)


def _brief(error: BaseException) -> str:
    """An error's first line, cut to its first sentence when long (torch.load's go on for lines)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if len(first) > 160 and ". " in first:
        first = first.split(". ")[0]
    return first if isinstance(error, OSError) or not text else f"{type(error).__name__}: {first}"


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def checkpoint_step(path: str) -> int:
    """The step of a checkpoint folder (its trainer_state.json, else its checkpoint-<step> name)."""
    state = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            return int(json.load(f).get("global_step", 0))
    tail = os.path.basename(os.path.normpath(path)).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _read_manifest(folder: str) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None), (None, None) when there is none, or (None, problem): unreadable, not
    JSON, or JSON of other types than `write_manifest` writes."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        problem = _manifest_type_problem(manifest)
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        return None, f"{MANIFEST_NAME} is damaged ({problem})"
    return manifest, None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _manifest_type_problem(manifest) -> Optional[str]:
    """What in a parsed manifest is not what `write_manifest` writes, or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if manifest.get("format") != _FORMAT:
        return f"format {manifest.get('format')!r}"
    block, files, run = manifest.get("block_bytes"), manifest.get("files"), manifest.get("run")
    if not _is_int(block) or block <= 0:
        return f"block_bytes {block!r} is not a positive int"
    if not isinstance(files, dict):
        return f"files is {type(files).__name__}, not an object"
    for rel, meta in files.items():
        if not isinstance(meta, dict) or not _is_int(meta.get("size")) or meta["size"] < 0 \
                or not isinstance(meta.get("crc32"), str):
            return f"the entry of {rel} is not {{size: int >= 0, crc32: str}}"
        if len(meta["crc32"].split()) != _block_count(meta["size"], block):
            return f"the entry of {rel} has {len(meta['crc32'].split())} checksums for {meta['size']} bytes " \
                   f"in blocks of {block}"
    if run is not None:
        if not isinstance(run, dict):
            return f"run is {type(run).__name__}, not an object"
        for key in ("teacher", "data"):
            part = run.get(key)
            if part is not None and not (isinstance(part, dict) and isinstance(part.get("name"), str)
                                         and isinstance(part.get("digest"), str)):
                return f"run.{key} is not {{name: str, digest: str, ...}}"
    return None


def _legacy_problems(folder: str) -> list[str]:
    """The checks a checkpoint without a manifest gets: what transformers would otherwise turn
    into a default-config model or a JSON traceback without a file name."""
    problems = []
    if not os.path.isfile(os.path.join(folder, "config.json")):
        problems.append("config.json is missing (the weights are never loaded into a default model config)")
    state = os.path.join(folder, "trainer_state.json")
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except FileNotFoundError:
        problems.append("trainer_state.json is missing")
    except (OSError, ValueError) as e:
        problems.append(f"trainer_state.json is damaged ({e})")
    return problems


def _file_problems(folder: str, manifest: dict) -> list[str]:
    problems, sized = [], {}
    for rel, meta in manifest["files"].items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
            continue
        size, want = os.path.getsize(path), int(meta["size"])
        if size == want:
            sized[rel] = size
        elif size == 0:
            problems.append(f"{rel} is empty (written with {want} bytes)")
        elif size < want:
            problems.append(f"{rel} is truncated ({size} of {want} bytes)")
        else:
            problems.append(f"{rel} has {size} bytes, written with {want}")
    block = manifest["block_bytes"]  # the manifest's own block size (checked by _read_manifest)
    for rel, got in _block_crcs(folder, sized, block).items():
        want = manifest["files"][rel]["crc32"].split()
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        if bad or len(got) != len(want):
            i = bad[0] if bad else min(len(got), len(want))
            end = min(sized[rel], (i + 1) * block)
            problems.append(f"{rel} does not match its checksum (bytes {i * block}-{end}): damaged, or "
                            "a file of another run or step")
    return problems


def checkpoint_problem(folder: str) -> Optional[str]:
    """What is wrong with a checkpoint folder's files, in one line; None when intact (or, without
    a manifest, when the checks that need none pass)."""
    if not os.path.isdir(folder):
        return "no such checkpoint folder"
    manifest, problem = _read_manifest(folder)
    if problem:
        return problem
    problems = _legacy_problems(folder) if manifest is None else _file_problems(folder, manifest)
    return "; ".join(problems) or None


def _is_checkpoint_name(name: str) -> bool:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    head, _, tail = name.rpartition("-")
    return head == PREFIX_CHECKPOINT_DIR and tail.isdigit()


def checkpoints(run_dir: str) -> list[str]:
    """checkpoint-<step> folders of a run folder, newest first."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(run_dir):
            if _is_checkpoint_name(name) and os.path.isdir(os.path.join(run_dir, name)):
                found.append((int(name.rpartition("-")[2]), os.path.join(run_dir, name)))
    return [path for _step, path in sorted(found, reverse=True)]


def _instead(folder: str) -> str:
    """Where to resume from instead of a damaged checkpoint: the newest intact sibling."""
    here = os.path.abspath(folder)
    run_dir = os.path.dirname(here)
    for other in checkpoints(run_dir):
        if os.path.abspath(other) != here and checkpoint_problem(other) is None:
            unverified = "" if os.path.isfile(os.path.join(other, MANIFEST_NAME)) else \
                " (written without a manifest: not verified)"
            return (f"the newest intact checkpoint is {other}{unverified}: resume from it "
                    f"(align-ti distill --resume-from {other})")
    return f"no intact checkpoint in {run_dir}: start again without --resume"


def verify_checkpoint(folder: str, run: Optional[dict] = None, allow_changes: bool = False) -> Optional[dict]:
    """Check a checkpoint before a resume loads it; return its manifest (None for one written
    before manifests existed, which gets a warning).

    Raises CheckpointError, one line, naming the folder and each damaged, missing or foreign file
    and the newest intact checkpoint to resume from instead; or, when ``run`` (`run_identity` of
    the resuming run) differs from the run that wrote it in teacher, data or world size, naming
    what changed -- unless ``allow_changes``, which warns and goes on.
    """
    folder = os.fspath(folder)
    problem = checkpoint_problem(folder)
    if problem:
        raise CheckpointError(f"cannot resume from {folder}: {problem}; {_instead(folder)}")
    manifest, _ = _read_manifest(folder)
    if manifest is None:
        warnings.warn(f"align-ti: checkpoint {folder} has no {MANIFEST_NAME} (written before manifests "
                      "existed): its files cannot be verified before they are loaded", stacklevel=2)
        return None
    changes = _run_changes(manifest.get("run"), run)
    if changes and not allow_changes:
        raise CheckpointError(f"cannot resume from {folder}: it was written by another run ({'; '.join(changes)}); "
                              "resuming would continue that training under other conditions. Pass --resume-anyway "
                              "(run_distill(resume_anyway=True)) to go on regardless")
    if changes:
        warnings.warn(f"align-ti: resuming from {folder} although {'; '.join(changes)} (resume_anyway)", stacklevel=2)
    return manifest


@contextlib.contextmanager
def loading(folder: str, what: str):
    """Turn an error while loading part of a checkpoint (a SafetensorError, a torch.load
    traceback) into one CheckpointError line naming the folder and the files."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- re-raised with the folder named, the cause chained
        raise CheckpointError(f"checkpoint {folder}: cannot load {what}: {_brief(e)}; "
                              f"{_instead(folder)}") from e
