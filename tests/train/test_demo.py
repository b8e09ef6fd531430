"""`align-ti demo` (issue #21): the statistics against known answers, the teacher-margin refusal,
the report's words, the committed --full run's files against each other, and (e2e) a --quick
run end to end."""
import json
import os

import numpy as np
import pytest

from align_ti.cli import main
from align_ti.train.demo import METHODS
from align_ti.train.demo.report import markdown, teacher_margin_refusal
from align_ti.train.demo.settings import DemoSettings
from align_ti.train.demo.stats import holm, item_comparison, seed_comparison

COMMITTED = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "cpu", "demo")


def test_holm_matches_the_textbook_example():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(1 * 0.04, 0.06)
    got = holm({"a": 0.04, "b": 0.01, "c": 0.03})
    assert got == pytest.approx({"a": 0.06, "b": 0.03, "c": 0.06})
    assert holm({"a": 0.6, "b": 0.9}) == {"a": 1.0, "b": 1.0}


def test_seed_comparison():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.5, 8)
    better = seed_comparison(base + 0.05 + rng.normal(0, 0.005, 8), base, "greater")
    assert better["p_ttest"] < 1e-4 and better["ahead"] == 8 and better["ci95"][0] > 0
    assert better["mean_difference"] == pytest.approx(0.05, abs=0.01)
    worse = seed_comparison(base, base + 0.05 + rng.normal(0, 0.005, 8), "greater")
    assert worse["p_ttest"] > 0.99 and worse["behind"] == 8
    same = seed_comparison(base, base, "greater")
    assert same["p_ttest"] == 1.0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="equal-length"):
        seed_comparison([0.1, 0.2], [0.1], "greater")


def test_item_comparison_counts_discordant_pairs():
    a = [[1, 1, 0, 1], [1, 0, 0, 1]]
    b = [[0, 1, 0, 0], [1, 0, 1, 0]]
    got = item_comparison(a, b, "greater")
    assert (got["a_only"], got["b_only"]) == (3, 1)
    assert got["mean_difference"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert got["p_mcnemar"] == pytest.approx(5 / 16)  # P(X >= 3), X ~ Binomial(4, 1/2)
    # items are the units: per-item mean differences [0.5, 0, -0.5, 1] (sum 1); flipping the signs
    # of 0.5, 0.5 and 1 gives a sum >= 1 in 3 of 8 cases (exact: 16 flips <= the resamples)
    assert got["p_items"] == pytest.approx(3 / 8)
    # one item right on every seed by A only: pooled McNemar counts 8 pairs, the item test 1 unit
    one = item_comparison([[1, 0]] * 8, [[0, 0]] * 8, "greater")
    assert one["p_mcnemar"] == pytest.approx(1 / 256) and one["p_items"] > 0.2


def test_teacher_margin_refusal():
    settings = DemoSettings()
    teacher = {"validation": {"exact_match": 0.7}}
    sft = [{"validation": {"exact_match": x}} for x in (0.45, 0.55)]
    assert teacher_margin_refusal(settings, teacher, sft) is None  # 0.7 - 0.5 >= 0.2
    close = [{"validation": {"exact_match": x}} for x in (0.55, 0.6)]
    said = teacher_margin_refusal(settings, teacher, close)
    assert "not met" in said and "0.125" in said.replace("+", "")


def _committed():
    with open(os.path.join(COMMITTED, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(COMMITTED, "items.json")) as f:
        return results, json.load(f)


def test_committed_run_is_the_full_demo_and_its_files_agree():
    """The committed --full run: >= 8 paired seeds, >= 1,000 held-out items, all six methods and
    the A/A pair; each run's exact match in results.json is the mean of its per-item results in
    items.json, and the report's p-values follow from the per-seed values."""
    from scipy import stats

    results, items = _committed()
    s = results["settings"]
    assert len(s["seeds"]) >= 8 and not s["quick"] and results["refused"] is None
    assert set(results["methods"]) == set(METHODS) and results["aa"] is not None
    assert len(items["items"]) == results["task"]["items"]["heldout"] >= 1000
    by_run = {(r["method"], r["seed"]): r for r in items["runs"]}
    for r in results["runs"]:
        exact = by_run[(r["method"], r["seed"])]["exact"]
        assert len(exact) == len(items["items"])
        assert r["heldout"]["exact_match"] == pytest.approx(exact.count("1") / len(exact))
    for c in results["comparisons"]:
        a, b = results["methods"][c["a"]], results["methods"][c["b"]]
        p = stats.ttest_rel(a["exact_match"]["per_seed"], b["exact_match"]["per_seed"], alternative="greater").pvalue
        assert c["p_ttest"] == pytest.approx(p)
    # Holm's adjustment and the verdicts follow from the p-values; the item-level test from items.json
    adjusted = holm({i: c["p_ttest"] for i, c in enumerate(results["comparisons"])})
    seeds = s["seeds"]
    exact = {(r["method"], r["seed"]): [int(x) for x in r["exact"]] for r in items["runs"]}
    for i, c in enumerate(results["comparisons"]):
        assert c["p_holm"] == pytest.approx(adjusted[i]) and c["significant"] == (adjusted[i] < 0.05)
        got = item_comparison([exact[(c["a"], k)] for k in seeds], [exact[(c["b"], k)] for k in seeds], "greater",
                              seed=i)
        assert got["p_items"] == pytest.approx(c["items"]["p_items"]), c["hypothesis"]
    table = markdown(results)
    for c in results["comparisons"]:
        assert f"**{c['hypothesis']}: {'significant' if c['significant'] else 'not significant'}**" in table


def test_report_says_what_is_significant_and_refuses_without_margin():
    results, _ = _committed()
    flipped = json.loads(json.dumps(results))
    for c in flipped["comparisons"]:
        c["significant"] = not c["significant"]
    text = markdown(flipped)
    for c in flipped["comparisons"]:
        assert f"**{c['hypothesis']}: {'significant' if c['significant'] else 'not significant'}**" in text
    flipped["refused"] = "teacher margin not met: ..."
    assert "**The methods are not compared: teacher margin not met" in markdown(flipped)


@pytest.mark.e2e
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("results.json", "items.json", "results.md", "accuracy.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "runs").exists()  # the trainers' output folders are removed
    results = json.loads((out / "results.json").read_text())
    items = json.loads((out / "items.json").read_text())
    assert list(results["methods"]) == list(METHODS) and results["aa"] is not None
    assert len(results["comparisons"]) == 6 and len(results["secondary"]) == 4
    assert len(items["runs"]) == len(results["runs"]) == 2 * len(METHODS) + 2
    for m in results["methods"].values():
        assert 0 <= m["exact_match"]["mean"] <= 1 and m["kl_reference"]["mean"] > 0
    for r in results["runs"]:
        for term, w in METHODS[r["method"]].items():
            if term.startswith("w_"):
                assert (f"loss_{term[2:]}" in r["curves"]) == (w > 0), (r["method"], term)
    assert "A `--quick` run" in printed and "| vanilla KD |" in printed


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_failing_teacher_stops_the_run_and_keeps_the_users_files(tmp_path, monkeypatch):
    """The SFT workers wait for the teacher: when its training fails, they stop too and the error
    reaches the caller (no hang); a run removes only its own scratch folder, never files the
    output folder already held (e.g. a runs/ folder of the user's)."""
    from align_ti.train.demo import run as demo_run

    out = tmp_path / "demo"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "keep.txt").write_text("mine")
    (out / "teacher.pt").write_text("mine too")

    def failing_teacher(*args, **kwargs):
        raise RuntimeError("teacher exploded")

    monkeypatch.setattr(demo_run, "train_teacher", failing_teacher)
    settings = DemoSettings.quick_check()
    with pytest.raises(RuntimeError, match="teacher exploded"):
        demo_run.run_demo(settings, str(out), log=lambda *a: None)
    assert (out / "runs" / "keep.txt").read_text() == "mine" and (out / "teacher.pt").read_text() == "mine too"
    assert sorted(p.name for p in out.iterdir()) == ["runs", "teacher.pt"]  # the scratch folder is gone


@pytest.mark.e2e
def test_runs_do_not_depend_on_the_workers(tmp_path):
    """A run's results are the same in forked workers as in this process (same initial weights,
    data order and teacher, whatever runs beside it)."""
    got = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["demo", "--quick", "--methods", "SFT,Align-TI", "--workers", str(workers), "--out", str(out)]) == 0
        runs = json.loads((out / "results.json").read_text())["runs"]
        got[workers] = {(r["method"], r["seed"]): r["heldout"] for r in runs}
    assert got[1].keys() == got[2].keys() and len(got[1]) == 4
    for key, held in got[1].items():
        assert held == got[2][key], key


def test_bad_flags_exit_2(tmp_path, capsys):
    assert main(["demo", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 2" in capsys.readouterr().err
    assert main(["demo", "--methods", "SFT,XYZ", "--out", str(tmp_path)]) == 2
    assert "--methods: unknown ['XYZ']" in capsys.readouterr().err


def test_greedy_answers_and_kl_along_prefixes(tiny):
    """`generate_answers` (batched by prompt length, KV cache) gives the tokens of a plain
    argmax loop over full forwards; `kl_along` the reference answers given as continuations
    equals `kl_along` the labels."""
    import torch

    from align_ti.constants import IGNORE_INDEX
    from align_ti.data.llava import pad_batch
    from align_ti.train.demo.evaluate import generate_answers, kl_along

    examples = [tiny.dataset[i] for i in range(5)]
    eos = tiny.processor.tokenizer.eos_token_id
    got = generate_answers(tiny.student, examples, eos, max_new_tokens=4, batch_size=2)
    for ex, answer in zip(examples, got):
        start = int((ex["labels"] != IGNORE_INDEX).nonzero()[0])
        ids, want = ex["input_ids"][:start], []
        pixels = pad_batch([{"input_ids": ids, "pixel_values": ex["pixel_values"]}], 0)["pixel_values"]
        with torch.no_grad():
            for _ in range(4):
                logits = tiny.student(input_ids=ids[None], pixel_values=pixels).logits
                want.append(int(logits[0, -1].argmax()))
                if want[-1] == eos:
                    break
                ids = torch.cat([ids, torch.tensor([want[-1]])])
        assert answer == want
    references = [ex["labels"][ex["labels"] != IGNORE_INDEX].tolist() for ex in examples]
    assert kl_along(tiny.student, tiny.teacher, examples, references) == pytest.approx(
        kl_along(tiny.student, tiny.teacher, examples), rel=1e-5)
