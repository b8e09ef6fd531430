"""Statistics of the demo's comparisons, with scipy.stats doing the tests.

Seeds are the unit of replication: a seed fixes a student's initial weights and its data order,
and every method trains from the same ones, so methods are compared *paired by seed*:

- `seed_comparison`: the per-seed differences of a metric, a one-sided paired t-test
  (``scipy.stats.ttest_rel``, the primary test), the Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, no normality assumption) and a bootstrap confidence interval of
  the mean difference (``scipy.stats.bootstrap``).
- `holm`: Holm's step-down adjustment of a family of p-values (controls the family-wise error;
  an adjustment, not a test).
- `item_comparison`: the saved per-item results of two methods on the same seeds. Items are the
  independent units (each is answered once per seed): a sign-flip permutation test over items
  of each item's mean difference over seeds (``scipy.stats.permutation_test``) and a bootstrap
  over items of the mean difference. They measure item-sampling noise only, not the
  seed-to-seed noise of training, so they are the weaker evidence; the A/A pair shows how far.
  McNemar's exact test on the discordant (item, seed) pairs (``scipy.stats.binomtest``) is kept
  for reference: it counts an item's 8 answers as 8 independent pairs, so its p-value is too
  small (anti-conservative).
- `mean_ci`: a bootstrap interval of one method's mean over seeds.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from align_ti.train.demo.settings import AA_METHOD, AA_SEED_OFFSET, COMPARISONS, METHOD_LABELS, METHODS

__all__ = ["holm", "mean_ci", "seed_comparison", "item_comparison", "method_summary", "analyse"]

ALPHA = 0.05
RESAMPLES = 10_000


def holm(pvalues: dict) -> dict:
    """Holm-adjusted p-values, same keys: the i-th smallest of m is multiplied by m - i
    (i from 0), made monotone, capped at 1."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return out


def _bootstrap_ci(values, seed: int, statistic=np.mean) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return float(statistic(values)), float(statistic(values))  # no spread: a point
    res = stats.bootstrap((values,), statistic, n_resamples=RESAMPLES, confidence_level=1 - ALPHA,
                          method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(values, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values``."""
    return _bootstrap_ci(values, seed)


def seed_comparison(a, b, alternative: str = "greater", seed: int = 0) -> dict:
    """``a`` vs ``b`` paired by seed (equal-length sequences, one value per seed).

    ``alternative``: "greater" (H1: a > b), "less" or "two-sided". Returns the mean difference
    a - b, its 95% bootstrap interval, the per-seed differences, the number of seeds where a is
    ahead, and the p-values of the paired t-test (primary) and the Wilcoxon signed-rank test."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"seed_comparison needs two equal-length sequences of >= 2 values, got {a.shape} and {b.shape}")
    diff = a - b
    if np.all(diff == 0):  # identical results: no evidence either way (scipy's statistics are NaN)
        p_t = p_w = 1.0
    else:
        with warnings.catch_warnings():  # equal non-zero differences: t is infinite, p exact (0 or 1)
            warnings.simplefilter("ignore", RuntimeWarning)
            p_t = float(stats.ttest_rel(a, b, alternative=alternative).pvalue)
        p_w = float(stats.wilcoxon(diff, alternative=alternative).pvalue)
    low, high = _bootstrap_ci(diff, seed)
    return {"mean_difference": float(diff.mean()), "ci95": [low, high], "differences": diff.tolist(),
            "ahead": int((diff > 0).sum()), "behind": int((diff < 0).sum()), "p_ttest": p_t, "p_wilcoxon": p_w,
            "alternative": alternative}


def item_comparison(a_items, b_items, alternative: str = "greater", seed: int = 0) -> dict:
    """Per-item 0/1 results of two methods, ``[seeds][items]`` each, seed i of one paired with
    seed i of the other. ``p_items``: a sign-flip permutation test over items of each item's
    mean over seeds of a - b (items independent; H0: each item's difference is symmetric about
    0); the bootstrap resamples items likewise. ``a_only`` / ``b_only`` count the (item, seed)
    pairs where exactly one is right, and ``p_mcnemar`` is McNemar's exact test on them, which
    treats an item's seeds as independent pairs (anti-conservative: for reference only)."""
    a, b = np.asarray(a_items, dtype=float), np.asarray(b_items, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"item_comparison needs two [seeds, items] arrays of one shape, got {a.shape} and {b.shape}")
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n = a_only + b_only
    p_mcnemar = float(stats.binomtest(a_only, n, 0.5, alternative=alternative).pvalue) if n else 1.0
    per_item = (a - b).mean(0)
    if np.all(per_item == 0):
        p_items = 1.0
    else:
        p_items = float(stats.permutation_test((per_item,), np.mean, permutation_type="samples", vectorized=True,
                                               alternative=alternative, n_resamples=RESAMPLES,
                                               rng=np.random.default_rng(seed)).pvalue)
    low, high = _bootstrap_ci(per_item, seed)
    return {"mean_difference": float(per_item.mean()), "ci95": [low, high], "p_items": p_items, "a_only": a_only,
            "b_only": b_only, "p_mcnemar": p_mcnemar, "alternative": alternative}


# ---- the demo's analysis: every number the report states --------------------------------------

def _by_method(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["method"], {})[r["seed"]] = r
    return out


def method_summary(runs_of_method: dict, label: str, weights: dict, seeds) -> dict:
    """Mean, std and bootstrap interval over seeds of each held-out metric of one method."""
    rs = [runs_of_method[s] for s in seeds]
    out = {"label": label, "weights": weights, "seeds": list(seeds)}
    for metric in ("exact_match", "f1", "kl_reference", "kl_own", "exposure_ratio"):
        values = [r["heldout"][metric] for r in rs]
        out[metric] = {"per_seed": values, "mean": float(np.mean(values)),
                       "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                       "ci95": list(mean_ci(values))}
    out["validation_exact_match"] = float(np.mean([r["validation"]["exact_match"] for r in rs]))
    out["train_wall_s_mean"] = float(np.mean([r["train_wall_s"] for r in rs]))
    out["train_cpu_s_mean"] = float(np.mean([r["train_cpu_s"] for r in rs]))
    return out


def _exact(runs_of_method: dict, seeds) -> list[list[int]]:
    return [runs_of_method[s]["heldout"]["exact"] for s in seeds]


def _metric(runs_of_method: dict, seeds, metric: str) -> list[float]:
    return [runs_of_method[s]["heldout"][metric] for s in seeds]


def analyse(settings, runs: list[dict], refused) -> dict:
    """Per-method summaries, the primary comparisons (held-out exact match, one-sided, paired by
    seed, Holm over the family of those that ran, plus the item-level test), the secondary ones
    (exposure bias and distance to the teacher, Holm within their own family), and the A/A pair."""
    by = _by_method(runs)
    seeds = list(settings.seeds)
    main = {m: {s: r for s, r in by.get(m, {}).items() if s in seeds} for m in METHODS}
    methods = {m: method_summary(main[m], METHOD_LABELS[m], METHODS[m], seeds) for m in settings.methods
               if len(main[m]) == len(seeds)}
    out = {"methods": methods, "comparisons": [], "secondary": [], "aa": None}
    if refused is not None and not settings.quick:
        return out
    primary = [(a, b) for a, b in COMPARISONS if a in methods and b in methods]
    for i, (a, b) in enumerate(primary):
        test = seed_comparison(_metric(main[a], seeds, "exact_match"), _metric(main[b], seeds, "exact_match"),
                               "greater", seed=i)
        test["f1"] = seed_comparison(_metric(main[a], seeds, "f1"), _metric(main[b], seeds, "f1"), "greater", seed=i)
        test["items"] = item_comparison(_exact(main[a], seeds), _exact(main[b], seeds), "greater", seed=i)
        out["comparisons"].append({"a": a, "b": b, "hypothesis": f"{a} > {b}", "metric": "exact_match", **test})
    _holm_into(out["comparisons"])
    # secondary: what TPA is for (exposure bias) and how close each student gets to the teacher
    secondary = [(m, "KD", metric) for m in ("TPA", "Align-TI") if m in methods and "KD" in methods
                 for metric in ("exposure_ratio", "kl_own")]
    for i, (a, b, metric) in enumerate(secondary):
        test = seed_comparison(_metric(main[a], seeds, metric), _metric(main[b], seeds, metric), "less", seed=100 + i)
        out["secondary"].append({"a": a, "b": b, "hypothesis": f"{a} < {b}", "metric": metric, **test})
    _holm_into(out["secondary"])
    aa_seeds = [AA_SEED_OFFSET + s for s in seeds]
    aa = by.get(AA_METHOD, {})
    if settings.aa_pair and all(s in aa for s in aa_seeds) and AA_METHOD in methods:
        twin = {s: aa[AA_SEED_OFFSET + s] for s in seeds}
        test = seed_comparison(_metric(main[AA_METHOD], seeds, "exact_match"), _metric(twin, seeds, "exact_match"),
                               "two-sided", seed=200)
        test["items"] = item_comparison(_exact(main[AA_METHOD], seeds), _exact(twin, seeds), "two-sided", seed=200)
        out["aa"] = {"method": AA_METHOD, "seeds": seeds, "twin_seeds": aa_seeds,
                     "twin": method_summary(twin, f"{METHOD_LABELS[AA_METHOD]} (A/A twin)", METHODS[AA_METHOD], seeds),
                     **test}
    return out


def _holm_into(tests: list[dict]) -> None:
    adjusted = holm({i: t["p_ttest"] for i, t in enumerate(tests)})
    for i, t in enumerate(tests):
        t["p_holm"] = adjusted[i]
        t["significant"] = adjusted[i] < ALPHA
