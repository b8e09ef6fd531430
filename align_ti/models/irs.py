"""IRS: which teacher layer's instruction->vision attention depends on the instruction.

METHOD.md, Definition 3.1: ``alpha_l(x)`` is layer l's attention mass from the instruction
queries to the vision keys (averaged over heads and instruction queries), and
``IRS(l) = 1 - E_(x1, x2) cos(alpha_l(x1), alpha_l(x2))`` over pairs that share an image but
carry different instructions. The chosen layer is ``argmax_l IRS(l)``.

Here every layer is captured in one forward per batch of inputs (``capture_qk`` with all
layers, under the model's own attention implementation, e.g. sdpa), and each layer's mass
comes from ``attention_mass`` on the captured q / k: no eager attention, no
``output_attentions``, no ``[B, H, L, L]``.

Calibration pairs (lists of ``(item_1, item_2)`` with ``item = {"image": PIL image,
"question": str}``) come from:
- ``load_calibration_jsonl``: a JSONL of ``{"image": path, "instructions": [a, b, ...]}``
  (every two instructions of one image form a pair; paths relative to the file);
- ``pairs_from_llava``: a LLaVA-format dataset, pairing samples that share an image;
- ``align_ti.data.synthetic.calibration_pairs``: the built-in synthetic pairs.

``run_irs`` (the ``align-ti irs`` command) writes ``irs.json`` and ``irs.png``;
``cached_irs_layer`` is the trainer's ``iva_layer=auto``: the argmax over pairs from the
training items, cached in ``irs.json`` under a key that names the teacher and the data.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from align_ti.validation import check_dim, check_same_device, check_tensor, describe

__all__ = [
    "IRSResult",
    "irs_scores",
    "select_vision_mass",
    "pair_cosines",
    "irs_argmax",
    "load_calibration_jsonl",
    "pairs_from_llava",
    "load_calibration_pairs",
    "run_irs",
    "plot_irs",
    "cached_irs_layer",
]


@dataclass
class IRSResult:
    """IRS of every decoder layer over a calibration set.

    scores: IRS(l) per layer (fp32 values as Python floats); layer: argmax (ties -> lowest);
    num_pairs: pairs used; cos_std: per layer, the std of the pair cosines (spread).
    """

    scores: list[float]
    layer: int
    num_pairs: int
    cos_std: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------------------


def load_calibration_jsonl(path, max_pairs: int | None = None) -> list[tuple[dict, dict]]:
    """Pairs from a JSONL of ``{"image": path, "instructions": [a, b, ...]}`` records.

    Image paths are relative to the JSONL's folder (absolute paths are kept). Every two
    distinct instructions of a record form one pair, in order: (a, b), (a, c), (b, c), ...
    A missing image file raises FileNotFoundError naming the file and the record's line.
    """
    from align_ti.data.llava import open_image

    path = Path(path)
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data: {path}:{n} is not valid JSON ({e})") from None
        if not isinstance(rec, dict) or "image" not in rec or not isinstance(rec.get("instructions"), list):
            raise ValueError(f"data: {path}:{n} must be an object with 'image' and a list 'instructions'")
        instructions = list(dict.fromkeys(str(x) for x in rec["instructions"]))
        if len(instructions) < 2:
            continue
        image_path = Path(rec["image"])
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        image = open_image(image_path, f"data: {path}:{n}")
        for a, b in itertools.combinations(instructions, 2):
            pairs.append(({"image": image, "question": a, "image_id": str(rec["image"])},
                          {"image": image, "question": b, "image_id": str(rec["image"])}))
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs
    return pairs


def pairs_from_llava(items: list[dict], max_pairs: int | None = None) -> list[tuple[dict, dict]]:
    """Pair LLaVA-format items (``load_llava_json``) that share an image and differ in question.

    Images are taken in order of first appearance; within one image, consecutive distinct
    questions are paired ((q1, q2), (q2, q3), ...), so every sample is used at most twice.
    """
    by_image: dict[str, list[dict]] = {}
    for item in items:
        if item.get("image") is None:
            continue
        by_image.setdefault(str(item.get("image_id")), []).append(item)
    pairs = []
    for group in by_image.values():
        seen, distinct = set(), []
        for item in group:
            if item["question"] not in seen:
                seen.add(item["question"])
                distinct.append(item)
        for a, b in zip(distinct, distinct[1:]):
            pairs.append((a, b))
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs
    return pairs


def load_calibration_pairs(data=None, samples: int = 32, seed: int = 0) -> list[tuple[dict, dict]]:
    """Calibration pairs from a file or, when ``data`` is None, the synthetic set.

    ``*.jsonl``: ``load_calibration_jsonl``; ``*.json``: a LLaVA-format dataset (images
    relative to its folder), paired by ``pairs_from_llava``. At most ``samples`` pairs.
    Samples that `load_llava_json` calls bad are left out (as `distill` with bad_samples=skip
    leaves them out) rather than refused: IRS reads only images and questions.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if data is None:
        from align_ti.data.synthetic import calibration_pairs

        return calibration_pairs(samples, seed=seed)
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data: no such file {path}")
    if path.suffix == ".jsonl":
        pairs = load_calibration_jsonl(path, max_pairs=samples)
    elif path.suffix == ".json":
        from align_ti.data.llava import load_llava_json

        items = load_llava_json(path, image_folder=path.parent, bad_samples="skip")
        pairs = pairs_from_llava(items, max_pairs=samples)
    else:
        raise ValueError(f"data: expected a .jsonl calibration file or a LLaVA-format .json, got {path}")
    if not pairs:
        raise ValueError(f"data: {path} yields no pair (an image with two different instructions)")
    return pairs


# --------------------------------------------------------------------------------------
# IRS
# --------------------------------------------------------------------------------------


def _encode(processor, item: dict) -> dict:
    """The prompt (image + instruction, no answer) with its instruction mask."""
    from align_ti.data.llava import encode_example

    enc = encode_example(processor, {"image": item["image"], "question": item["question"], "answer": ""},
                         return_instruction_mask=True)
    enc.pop("labels", None)
    return enc


@torch.no_grad()
def irs_scores(model, processor, pairs, batch_size: int = 4, impl: str = "auto") -> IRSResult:
    """IRS(l) of every decoder layer of a LLaVA-style ``model`` over calibration ``pairs``.

    Args:
        model: a vision-language model of a supported family (`align_ti.models.families`: LLaVA,
            LLaVA-OneVision, Qwen2-VL / 2.5-VL / 3-VL, InternVL; any attention implementation,
            not changed). Its family gives the vision tokens, the image inputs and the position ids.
        processor: its processor (chat template + image processor), e.g. ``build_processor``.
        pairs: ``[(item_1, item_2), ...]``, items ``{"image": PIL image, "question": str}``;
            both items of a pair share the image (same number of vision tokens).
        batch_size: pairs per forward (each forward runs ``2 * batch_size`` sequences and
            captures every layer at once).
        impl: passed to ``attention_mass``.

    Returns:
        ``IRSResult``: ``scores[l] = 1 - mean over pairs of cos(alpha_l(x1), alpha_l(x2))``
        with ``alpha_l`` the head- and instruction-averaged attention mass on the vision
        tokens (`pair_cosines`: a zero mass counts as cos 0); ``layer = argmax_l``.
    """
    from align_ti.data.llava import pad_batch
    from align_ti.models.capture import capture_qk
    from align_ti.models.families import family_of
    from align_ti.ops.attention_mass import attention_mass

    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty: IRS needs at least one calibration pair")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    family = family_of(model)
    pad_id = processor.tokenizer.pad_token_id or 0
    cosines = []  # [n_layers, P] per batch
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            examples = [_encode(processor, it) for pair in chunk for it in pair]  # x1, x2, x1, x2 ...
            batch = pad_batch(examples, pad_id)
            qmask = batch.pop("instruction_mask").to(device)
            batch = {k: v.to(device) for k, v in batch.items()}
            ids, real = batch["input_ids"], batch["attention_mask"]
            images = family.model_images(batch, dtype)
            vision = family.vision_mask(model.config, ids)
            positions = family.position_ids(model, ids, real, images)
            with capture_qk(model, layers=None, detach=True) as cap:
                model(input_ids=ids, attention_mask=real, position_ids=positions, use_cache=False, logits_to_keep=1,
                      **images)
            masses = torch.stack([
                attention_mass(*cap[l], qmask, batch["attention_mask"], impl=impl) for l in cap.layers
            ])  # [n_layers, 2P, L]
            del cap
            # pair by pair: the two items of a pair share their image, but images of other pairs may
            # have other token counts (dynamic resolution, tiling)
            for p in range(len(chunk)):
                alpha = select_vision_mass(masses[:, 2 * p:2 * p + 2].float(), vision[2 * p:2 * p + 2])  # [n_l, 2, Nv]
                cosines.append(pair_cosines(alpha[:, :1], alpha[:, 1:]).cpu())  # [n_layers, 1]
    finally:
        model.train(was_training)
    cos = torch.cat(cosines, dim=1)  # [n_layers, P]
    scores = (1.0 - cos.mean(dim=1)).float()
    std = cos.std(dim=1) if cos.shape[1] > 1 else torch.zeros(cos.shape[0], dtype=cos.dtype)
    return IRSResult(scores=[float(s) for s in scores], layer=irs_argmax(scores),
                     num_pairs=cos.shape[1], cos_std=[float(s) for s in std])


# --------------------------------------------------------------------------------------
# the maths of IRS (align_ti.reference.attention_mass holds its own plain copy: an oracle
# must not share code with what it checks)
# --------------------------------------------------------------------------------------


def select_vision_mass(mass: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
    """Restrict each sample's mass to its own vision-token positions, in order.

    mass ``[..., B, L]`` (e.g. ``[num_layers, B, L]``); vision_mask bool ``[B, L]``, the same
    number ``Nv >= 1`` of vision tokens in every sample (positions may differ). Returns
    ``[..., B, Nv]``: ``out[..., b, n]`` is the mass at sample b's n-th vision token.
    """
    check_tensor("mass", mass, floating=True)
    if mass.dim() < 2:
        raise ValueError(f"mass must be at least 2-D [..., B, L], got shape {list(mass.shape)}")
    check_tensor("vision_mask", vision_mask, ndim=2, dtypes=(torch.bool,))
    B, L = mass.shape[-2], mass.shape[-1]
    check_dim("vision_mask", vision_mask, 0, B, "the batch size of mass (dim -2)")
    check_dim("vision_mask", vision_mask, 1, L, "the sequence length of mass (dim -1)")
    check_same_device({"mass": mass, "vision_mask": vision_mask})
    if B == 0:
        raise ValueError(f"mass holds no sample (B = 0, shape {list(mass.shape)})")
    counts = vision_mask.sum(dim=1)
    # a shape decision, so it looks at the contents whatever the value-check setting
    if bool((counts != counts[0]).any()):
        raise ValueError(f"vision_mask must mark the same number of vision tokens in every sample, "
                         f"got counts {counts.tolist()}")
    nv = int(counts[0])
    if nv == 0:
        raise ValueError("vision_mask marks no vision token (Nv = 0): IRS is undefined")
    # sort positions by (not vision, position): the vision positions come first, in order
    pos = torch.arange(L, device=mass.device)
    order = torch.argsort((~vision_mask).to(torch.int64) * L + pos, dim=1)
    return torch.gather(mass, -1, order[:, :nv].expand(*mass.shape[:-2], B, nv))


def pair_cosines(alpha_1: torch.Tensor, alpha_2: torch.Tensor) -> torch.Tensor:
    """``cos(alpha_1, alpha_2)`` over the last dim, in fp64; 0 where a vector is all zero (a
    sample with no selected query), so such a pair counts as fully instruction-dependent.
    Exactly ``a . b / (|a| |b|)`` (no eps clamp: invariant to scaling either side)."""
    a, b = alpha_1.double(), alpha_2.double()
    dot = (a * b).sum(-1)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    ok = denom > 0
    return torch.where(ok, dot / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(dot))


def irs_argmax(scores: torch.Tensor) -> int:
    """The chosen layer ``l* = argmax_l IRS(l)`` of finite ``[num_layers]`` scores; ties go to
    the lowest layer index."""
    check_tensor("scores", scores, ndim=1, floating=True)
    if scores.numel() == 0:
        raise ValueError("scores is empty: no layer to choose")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores must be finite; it holds NaN or inf ({describe(scores)})")
    return int(torch.nonzero(scores == scores.max())[0, 0])


# --------------------------------------------------------------------------------------
# outputs and the CLI driver
# --------------------------------------------------------------------------------------


def plot_irs(result: IRSResult, path, title: str = "IRS per layer") -> Path:
    """A bar chart of IRS(l) with the chosen layer highlighted (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.scores)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n + 2), 3.2), dpi=120)
    colors = ["tab:orange" if l == result.layer else "tab:blue" for l in range(n)]
    ax.bar(range(n), result.scores, color=colors)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("IRS = 1 - E[cos]")
    ax.set_title(f"{title}\nchosen layer {result.layer} ({result.num_pairs} pairs)", fontsize=9)
    ax.set_xticks(range(n) if n <= 40 else range(0, n, max(1, math.ceil(n / 20))))
    top = max(result.scores) if result.scores else 1.0
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _load_model(model_path):
    """A local checkpoint of any supported family (model + processor) or, for None, the built-in
    tiny teacher."""
    if model_path is None:
        from align_ti.models.tiny import build_processor, build_tiny_llava

        model = build_tiny_llava("teacher")
        return model, build_processor(config=model.config), "tiny-teacher"
    path = Path(model_path)
    if not path.exists():
        raise ValueError(f"model: no such local checkpoint {path} (nothing is downloaded)")
    from align_ti.train.data import load_model_and_processor

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model, processor = load_model_and_processor(str(path), dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return model, processor, str(path)


def run_irs(model=None, data=None, samples: int = 32, out=".", batch_size: int = 4, seed: int = 0) -> IRSResult:
    """Compute IRS for every layer and write ``<out>/irs.json`` and ``<out>/irs.png``.

    model: a local checkpoint path, or None for the built-in tiny teacher. data: a
    calibration JSONL, a LLaVA-format JSON, or None for the synthetic pairs. samples: the
    number of pairs.
    """
    import datetime
    import platform

    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = load_calibration_pairs(data, samples=samples, seed=seed)  # data errors before a model loads
    m, processor, model_name = _load_model(model)
    result = irs_scores(m, processor, pairs, batch_size=batch_size)
    text_cfg = getattr(m.config, "text_config", m.config)
    record = {
        **result.to_dict(),
        "model": model_name,
        "data": str(data) if data is not None else "synthetic calibration pairs",
        "attn_implementation": getattr(text_cfg, "_attn_implementation", None),
        "device": str(next(m.parameters()).device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "irs.json").write_text(json.dumps(record, indent=2))
    plot_irs(result, out / "irs.png", title=f"IRS per layer: {Path(model_name).name}")
    if model is None:
        record["note"] = "built-in tiny teacher with random weights: scores show the plumbing, not a real choice"
        (out / "irs.json").write_text(json.dumps(record, indent=2))
    return result


# --------------------------------------------------------------------------------------
# the trainer's iva_layer=auto: IRS once per teacher and data, cached
# --------------------------------------------------------------------------------------


def cached_irs_layer(teacher, processor, items: list[dict], max_pairs: int, cache_dir: str, key: dict,
                     decide=None, write: bool = True) -> int:
    """The IRS argmax layer of ``teacher`` over up to ``max_pairs`` calibration pairs from
    ``items`` (samples sharing an image, `pairs_from_llava`), cached in ``<cache_dir>/irs.json``.

    ``key`` names what the result depends on besides the teacher's layer count (which is added
    to it): the teacher, the data, the seed, ... A cached file is reused when its key matches
    and its layer is one the teacher has; otherwise IRS runs and the file is (atomically)
    rewritten when ``write``. With several processes, ``decide`` (e.g. a broadcast from process
    0) makes the cached layer or None the same on every process, so that all run IRS or none."""
    n_layers = teacher.config.get_text_config().num_hidden_layers
    key = {**key, "teacher_layers": n_layers}
    path = os.path.join(cache_dir, "irs.json")
    layer = None
    if os.path.isfile(path):
        try:
            cached = json.loads(open(path).read())
            if cached.get("key") == key and 0 <= int(cached["layer"]) < n_layers:
                layer = int(cached["layer"])
        except (ValueError, KeyError, TypeError):
            pass
    if decide is not None:
        layer = decide(layer)
    if layer is not None:
        return layer
    pairs = pairs_from_llava(items, max_pairs=max_pairs)
    if not pairs:
        raise ValueError("iva_layer='auto' needs calibration pairs (two instructions on one image) in the "
                         "training data; none found: set iva_layer to a layer index")
    result = irs_scores(teacher, processor, pairs)
    if write:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"key": key, **result.to_dict()}, f, indent=2)
        os.replace(tmp, path)
    return int(result.layer)
