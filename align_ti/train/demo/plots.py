"""The demo's plots: accuracy per method (seeds as dots, the teacher as a line), the exposure
bias (KL along reference vs own prefixes), and the training-loss curves."""
from __future__ import annotations

import os

COLORS = {"SFT": "tab:gray", "KD": "tab:blue", "IVA": "tab:green", "TPA": "tab:orange", "Align-TI": "tab:red",
          "uniform-VKD": "tab:olive"}

__all__ = ["plot_all"]


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def plot_all(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    names = list(methods)
    if not names:
        return
    labels = [methods[n]["label"].replace(" (", "\n(") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), dpi=110)
    panels = (("exact_match", "held-out exact match (greedy)"), ("f1", "held-out object F1"),
              ("exposure_ratio", "KL own prefixes / KL reference prefixes"))
    for ax, (metric, title) in zip(axes, panels):
        for i, n in enumerate(names):
            m = methods[n][metric]
            xs = [i + (j - (len(m["per_seed"]) - 1) / 2) * 0.06 for j in range(len(m["per_seed"]))]
            ax.bar(i, m["mean"], color=COLORS.get(n, "tab:purple"), alpha=0.7)
            ax.errorbar(i, m["mean"], yerr=[[m["mean"] - m["ci95"][0]], [m["ci95"][1] - m["mean"]]], color="black",
                        capsize=5)
            ax.scatter(xs, m["per_seed"], color="black", s=8, zorder=3)
        if metric in ("exact_match", "f1"):
            t = results["teacher"]["heldout"][metric]
            ax.axhline(t, color="black", ls="--", lw=1, label=f"teacher ({t:.3f})")
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.axhline(1.0, color="black", ls=":", lw=1)
        ax.set_title(f"{title}\n(mean, 95% bootstrap CI, dots: seeds)", fontsize=9)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"))
    plt.close(fig)

    keys = [k for k in ("loss_sft", "loss_kd", "loss_iva", "loss_tpa")
            if any(k in r["curves"] for r in results["runs"])]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for n in names:
            series = [dict(map(tuple, r["curves"][key])) for r in results["runs"]
                      if r["method"] == n and r["seed"] in methods[n]["seeds"] and key in r["curves"]]
            if not series:
                continue
            steps = sorted(set().union(*series))
            ax.plot(steps, [_mean([x[t] for x in series if t in x]) for t in steps], color=COLORS.get(n, "tab:purple"),
                    label=methods[n]["label"], lw=1.4)
        ax.set_title(key, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (mean over seeds)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"))
    plt.close(fig)
