"""What the demo runs: the methods, the comparisons it tests, and its settings (the default
run, ``--full`` and ``--quick``), with the command-line flags that change them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

#: loss weights (and options) of each method; all start from the same weights per seed
METHODS = {
    "SFT": dict(w_sft=1.0, w_kd=0.0, w_iva=0.0, w_tpa=0.0),
    "KD": dict(w_sft=1.0, w_kd=1.0, w_iva=0.0, w_tpa=0.0),
    "IVA": dict(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=0.0),
    "TPA": dict(w_sft=1.0, w_kd=1.0, w_iva=0.0, w_tpa=1.0),
    "Align-TI": dict(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=1.0),
    "uniform-VKD": dict(w_sft=1.0, w_kd=1.0, w_iva=1.0, w_tpa=0.0, iva_weighting="uniform"),
}
METHOD_LABELS = {
    "SFT": "SFT", "KD": "vanilla KD", "IVA": "IVA only (+KD)", "TPA": "TPA only (+KD)",
    "Align-TI": "Align-TI (KD+IVA+TPA)", "uniform-VKD": "uniform vision KD (+KD)",
}
DEFAULT_METHODS = ("SFT", "KD", "Align-TI")
#: one-sided hypotheses "first > second" on held-out exact match, paired by seed; the ones whose
#: methods both ran form one family for Holm's correction
COMPARISONS = (
    ("KD", "SFT"), ("Align-TI", "KD"), ("IVA", "KD"), ("TPA", "KD"), ("uniform-VKD", "KD"),
    ("IVA", "uniform-VKD"),
)
#: the A/A pair: this method trained again on other seeds (init and data order), paired with the
#: main seeds as if it were another method: what "no difference" looks like
AA_METHOD = "KD"
AA_SEED_OFFSET = 1000


#: the settings chosen on the validation split (short runs, validation exact match), and why;
#: results.md lists them
CHOSEN_ON_VALIDATION = {
    "teacher_lr": "1e-3 over 2e-3 (teacher validation exact match after 1500 steps 0.597 vs 0.447)",
    "student_lr": "3e-3 over 1e-3 (KD student, seed 0, 500 steps: 0.157 vs 0.080; SFT 0.070 vs 0.077)",
    "tpa_fraction": "1.0 over 0.5 (Align-TI, seeds 0 and 1, 500 steps: 0.303 / 0.303 vs 0.317 / 0.250)",
}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes, optimisation and statistics of one demo run (defaults: `align-ti demo`)."""

    seeds: tuple = tuple(range(8))
    methods: tuple = DEFAULT_METHODS
    aa_pair: bool = False               # train AA_METHOD on AA_SEED_OFFSET + seeds as well
    train_images: int = 3000            # 3 questions per image (describe, any order, a region)
    validation_images: int = 100        # settings and the teacher margin are decided here
    heldout_images: int = 400           # the reported numbers (>= 1,000 items)
    patch_size: int = 16                # 48x48 images -> 9 image tokens, one per grid cell
    vision_steps: int = 200             # vision pretraining (`runs.pretrain_vision`), then frozen
    teacher_size: dict = field(default_factory=dict)   # overrides of the tiny teacher (4 x 128)
    student_size: dict = field(default_factory=lambda: {"hidden_size": 96, "intermediate_size": 264})
    teacher_steps: int = 1500
    teacher_lr: float = 1e-3
    student_steps: int = 500
    student_lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    tpa_d: int = 4
    tpa_fraction: float = 1.0
    iva_layer: object = "auto"          # "auto": IRS argmax over the teacher's layers
    irs_samples: int = 64
    teacher_margin: float = 0.2         # teacher minus mean SFT student, validation exact match
    max_new_tokens: int = 16             # the longest answer has 14 tokens + the end token
    workers: int = 2                    # student runs in parallel processes (1 = in this process)
    threads: int = 1                    # torch threads per process (the teacher trains beside the workers)
    logging_steps: int = 25
    quick: bool = False                 # a pipeline check: no teacher-margin refusal

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def full(cls) -> "DemoSettings":
        """``--full``: all six methods, the A/A pair and the exposure-bias measure."""
        return cls(methods=tuple(METHODS), aa_pair=True)

    @classmethod
    def quick_check(cls) -> "DemoSettings":
        """``--quick``: the whole pipeline on a few items and steps (numbers mean nothing)."""
        return cls(seeds=(0, 1), methods=tuple(METHODS), aa_pair=True, train_images=40, validation_images=10,
                   heldout_images=20, vision_steps=5, teacher_steps=30, student_steps=6, batch_size=8,
                   warmup_steps=2, irs_samples=8, logging_steps=2, quick=True)


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output folder for results.json/.md, items.json and the PNGs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="a pipeline check (well under a minute on 2 CPU cores); its numbers mean nothing")
    mode.add_argument("--full", action="store_true",
                      help="all six methods, the A/A pair and the exposure-bias measure (about 30 minutes on 2 CPU "
                           "cores); the committed run")
    p.add_argument("--seeds", type=int, default=None, help="number of paired student seeds (default 8)")
    p.add_argument("--student-steps", type=int, default=None, help="optimizer steps per student run")
    p.add_argument("--teacher-steps", type=int, default=None, help="optimizer steps of the teacher SFT")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--workers", type=int, default=None,
                   help="student runs in parallel processes (default 2; 1 runs them in this process)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per student run (default 1)")


def settings_from_args(args) -> DemoSettings:
    """The settings of the flags; a bad value is a ValueError naming the flag."""
    s = DemoSettings.quick_check() if args.quick else DemoSettings.full() if args.full else DemoSettings()
    if args.seeds is not None:
        if args.seeds < 2:
            raise ValueError(f"--seeds must be >= 2 (the tests pair seeds), got {args.seeds}")
        s = replace(s, seeds=tuple(range(args.seeds)))
    for name in ("student_steps", "teacher_steps", "workers", "threads"):
        v = getattr(args, name)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
            s = replace(s, **{name: v})
    if args.methods:
        chosen = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            raise ValueError(f"--methods: unknown {unknown or chosen}; choose from {list(METHODS)}")
        s = replace(s, methods=chosen)
    return s
