"""lab/claims.py: the twelve claims of the text handtune teaches, each with a verdict computed from the lab's
results files (never written by hand): results/claims.json and results/claims.md.

For each claim: the experiment and metric that test it, the effect (signed so that positive is the claim's
direction), its 95% interval, the items and seeds behind it, and the verdict by one stated rule
(plumbing/intervals.verdict): "supported" if the interval lies above zero, "contradicted" if below,
"inconclusive" if it holds zero. Two models scored on the same items and seeds (per-item records in the
results file) get a paired bootstrap; results that hold only rates (the first, one-seed runs) get
Newcombe's interval for two independent rates, which is wider: the verdict is then conservative.

    python lab/claims.py                              # results/*.json -> results/claims.{json,md}
    python lab/claims.py --results /tmp/lab --out /tmp/lab   # the --quick outputs (what CI runs)
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing.cli import USER_ERRORS, error_line  # noqa: E402
from plumbing.files import atomic_write_text, read_json  # noqa: E402
from plumbing.intervals import newcombe, paired_bootstrap, verdict  # noqa: E402
from plumbing.report import markdown_table  # noqa: E402

# -----------------------------------------------------------------------------
# Reading the results files


def load(results, name):
    """results/NAME.json, or None if that experiment has not run."""
    path = os.path.join(results, f"{name}.json")
    if not os.path.isfile(path):
        return None
    return read_json(path)  # a damaged file: one line naming it


def row(rows, **match):
    """The one row of a results list whose fields equal match."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise ValueError(f"expected one results row with {match}, found {len(found)}")
    return found[0]


def compare(a, b, metric, n_a, n_b, seeds):
    """(effect a - b, [low, high], method) for a metric of two result rows. Rows with per-item scores
    ("items": {metric: [[score per item] per seed]}) are compared item by item; rates alone with
    Newcombe's interval (k = rate x n items)."""
    items_a, items_b = a.get("items", {}).get(metric), b.get("items", {}).get(metric)
    if items_a and items_b:
        d, lo, hi = paired_bootstrap(items_a, items_b)
        return d, [lo, hi], f"paired bootstrap over {len(items_a)} seeds x items"
    pa, pb = a[metric], b[metric]
    d, lo, hi = newcombe(round(pa * n_a), n_a, round(pb * n_b), n_b)
    return d, [lo, hi], "Newcombe, two independent rates" + (" (one seed)" if seeds == 1 else "")


# -----------------------------------------------------------------------------
# The claims: what tests each, read from its experiment's results


def seeds_of(d):
    return len(d.get("settings", {}).get("seeds", [d.get("config", {}).get("seed")]))


def items_of(d):
    return d.get("config", {}).get("eval_items", 40)


def claim_rows(results):
    """[(claim number, text, experiment, metric, (effect, ci, method) or None, n, seeds, settle)]."""
    out = []

    def add(number, text, experiment, metric, compute, settle):
        d = load(results, experiment.split("/")[0]) if "/" not in experiment else load(results, experiment)
        if callable(metric):  # the metric the results file can give (older files: fewer; None: not run)
            metric = metric(d)
        if d is None:
            out.append((number, text, experiment, metric, None, 0, 0, "not run yet: " + settle))
            return
        effect, n, *seeds = compute(d)  # the ladder's runs name their own seeds
        out.append((number, text, experiment, metric, effect, n, seeds[0] if seeds else seeds_of(d), settle))

    def pair(name_a, name_b, key, metric, n_of=items_of):
        def compute(d):
            n, s = n_of(d), seeds_of(d)
            a, b = row(d["results"], **{key: name_a}), row(d["results"], **{key: name_b})
            return compare(a, b, metric, n, n, s), n
        return compute

    add(1, "SFT is next-token prediction on the responses only: the loss on the reply, not the prompt, "
        "teaches the model to answer", "masking", "exact match, reply-only mask minus loss on every token",
        pair("reply only", "every token", "mask", "exact_match"),
        "a paired test on the full triage test split (250 items) with 3 seeds")
    add(2, "The model learns to stop: the end-of-turn token must be trained", "masking",
        "replies that stop by themselves, with the end token trained minus without",
        pair("reply only", "reply, no stop", "mask", "stops"),
        "a template whose end token the base model never emits (an instruct model already stops)")

    def instruct(d):
        n = d["settings"].get("seen items", 20)  # the first one-seed file: 20 seen, 20 held out, 40 triage
        a, b = row(d["results"], model="instruction-tuned"), row(d["results"], model="task-tuned (triage)")
        return compare(a, b, "instruct_seen", n, n, seeds_of(d)), n
    add(3, "Instruction tuning (a broad mix) teaches many tasks; task tuning teaches one", "instruct_vs_task",
        "instruct accuracy, instruction-tuned minus task-tuned", instruct, "more held-out skills and seeds")

    def ladder_run(d, name):
        """(rows, n items, seeds) of one run of results/ladder/ladder.json."""
        report = d["reports"][name]
        return [r for r in d["rows"] if r["run"] == name], report["n_items"], report.get("seeds", 1)

    def ladder(d):
        triage = [name for name, r in d["reports"].items() if r["task"] == "triage"]  # the longest-trained
        rows, n, seeds = ladder_run(d, max(triage, key=lambda name: d["reports"][name]["train"]["steps"]))
        tuned = row(rows, rung="fine_tuned")
        best = max((r for r in rows if r["rung"].startswith("base_")), key=lambda r: r["accuracy"])
        return compare(tuned, best, "accuracy", n, n, seeds), n, seeds
    add(4, "The ladder ends in fine-tuning: on a behaviour task it beats the cheaper rungs (prompting, "
        "few-shot, retrieval)", "ladder/ladder", "triage exact match, fine-tuned minus the best prompting rung", ladder,
        "bash lab/ladder.sh: 3 seeds, the triage LoRA trained 100 steps (the README's command) instead of 40, all "
        "250 test items, compared item by item; about 5 CPU-hours on a 2-core CPU in float32, minutes on a GPU")

    def retrieval(d):
        rows, n, seeds = ladder_run(d, "knowledge-lora")
        rows = [r for r in rows if r["questions"] == "v1"]
        return compare(row(rows, rung="base_retrieval"), row(rows, rung="base_zero_shot"), "accuracy", n, n,
                       seeds), n, seeds
    add(5, "Retrieval puts knowledge in the prompt: it beats prompting alone on facts", "ladder/ladder",
        "knowledge accuracy, base + BM25 retrieval minus base zero-shot", retrieval, "")

    def changes(d):
        rows, _, seeds = ladder_run(d, "knowledge-lora")
        rows = [r for r in rows if r["questions"] == "v2"]
        n = 84  # the questions whose answer changed with store version 2
        return compare(row(rows, rung="fine_tuned"), row(rows, rung="base_retrieval"), "stale", n, n, seeds), n, seeds
    add(6, "Fine-tuning changes behaviour, retrieval changes knowledge: knowledge that changes belongs in "
        "retrieval", "ladder/ladder", "stale answers after the store changed, fine-tuned minus retrieval",
        changes, "")

    def forgetting(d):
        n = items_of(d)
        base = row(d["results"], run="base")
        hot = row(d["results"], run="full lr 0.0002", step=32)
        if "instruct_nll" in hot:  # the format-free measure: positive = the reference replies got less likely
            return compare(hot, base, "instruct_nll", n, n, seeds_of(d)), n
        return compare(base, hot, "instruct_accuracy", n, n, seeds_of(d)), n

    def forgetting_metric(d):
        if d is None or "instruct_nll" in d["results"][0]:
            return "instruct reference-reply NLL (nats/token), full fine-tune at lr 2e-4 minus base"
        return "instruct accuracy, base minus full fine-tune at lr 2e-4"
    add(7, "Catastrophic forgetting: training hard on a narrow task costs general ability", "forgetting",
        forgetting_metric, forgetting,
        "more seeds of lab/forgetting.py (each adds ~12 CPU-minutes here), or its full learning-rate sweep")

    def overfit(d):
        n = items_of(d)
        a, b = row(d["results"], data="clean small"), row(d["results"], data="repetitive")
        field = lambda r: r if "items" in r else {"product": r["fields"]["product"]}  # noqa: E731 (old rows)
        return compare(field(a), field(b), "product", n, n, seeds_of(d)), n
    add(8, "Overfitting to surface patterns: repetitive data teaches a template, not the task", "quality",
        "product-field accuracy, clean small minus repetitive data (same size, equal compute)", overfit, "")
    def quirks(d):
        rows = [r for r in d["results"] if r.get("measured", "held out") == "held out"]  # old files: no "measured"
        last = max((r for r in rows if isinstance(r["generation"], int)), key=lambda r: r["generation"])
        return compare(last, row(rows, generation=0), "quirk_share", items_of(d), items_of(d), seeds_of(d)), items_of(d)
    add(9, "Model-generated data amplifies the base model's quirks", "self_generated",
        "quirk-phrase share of held-out replies, last generation minus the base model", quirks,
        "more held-out prompts (--eval-items 250) and seeds of lab/self_generated.py, or more generations")
    add(10, "Small, clean, diverse data beats large, messy data", "quality",
        "exact match, clean small minus noisy large", pair("clean small", "noisy large", "data", "exact_match"),
        "at 250 items x 3 seeds the gap is about +0.02; excluding zero at that size needs about 4x the "
        "item-seed pairs (12 seeds), or a setup where the labels matter more (--noise 0.5, more steps)")

    def enough(d):  # 100 steps x 8 = 800 distinct conversations (train.py's epoch order: no repeats)
        n = items_of(d)
        return compare(row(d["results"], run="full fine-tune (lr 5e-5)"), row(d["results"], run="base (no tuning)"),
                       "exact_match", n, n, seeds_of(d)), n
    add(11, "Thousands of examples suffice (not trillions of tokens)", "headline",
        "triage exact match, full fine-tune on 800 conversations minus the base model", enough,
        "more seeds of lab/headline.py")

    def storage(d):  # every seed's saved files, as the headline's runs wrote them
        full = row(d["results"], run="full fine-tune (lr 5e-5)")["per_seed"]["stored_bytes"]
        lora = row(d["results"], run="LoRA (r=16, lr 5e-4)")["per_seed"]["stored_bytes"]
        gains = [(f - a) / f for f, a in zip(full, lora)]  # the share of a full copy's bytes not stored
        method = "a measurement: file sizes on disk have no sampling noise (the interval: the seeds' range)"
        return (sum(gains) / len(gains), [min(gains), max(gains)], method), len(gains)
    add(12, "Full fine-tuning stores a whole model; LoRA trains and stores tiny adapters", "headline",
        "share of the full model's bytes an r=16 adapter saves (each seed's saved files)", storage, "")
    return out


# -----------------------------------------------------------------------------
# The table


def main(argv=None):
    p = argparse.ArgumentParser(description="Compute each claim's verdict from the lab's results files.")
    p.add_argument("--results", default=os.path.join(ROOT, "results"), help="where the results JSONs are")
    p.add_argument("--out", default=None, help="where claims.json and claims.md go (default: --results)")
    args = p.parse_args(argv)
    out = args.out or args.results
    try:
        claims = []
        for number, text, experiment, metric, effect, n, seeds, settle in claim_rows(args.results):
            c = {"claim": number, "text": text, "experiment": experiment, "metric": metric, "n": n,
                 "seeds": seeds}
            if effect is None:
                c.update(effect=None, ci=None, verdict="not measured", method=None, settle=settle)
            else:
                value, ci, method = effect
                c.update(effect=value, ci=ci, method=method, verdict=verdict(*ci))
                if c["verdict"] == "inconclusive":
                    c["settle"] = settle
            claims.append(c)
        table = markdown_table(
            ["#", "claim", "experiment", "metric", "effect", "95% interval", "n", "seeds", "verdict"],
            [[c["claim"], c["text"], f"`{c['experiment']}`", c["metric"],
              "-" if c["effect"] is None else f"{c['effect']:+.3f}",
              "-" if c["ci"] is None else f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]", c["n"], c["seeds"],
              f"**{c['verdict']}**"] for c in claims])
        counts = {v: sum(c["verdict"] == v for c in claims) for v in ("supported", "contradicted",
                                                                       "inconclusive", "not measured")}
        md = ["# The claims, measured", "",
              "Written by `python lab/claims.py` from the results files beside it; do not edit by hand.",
              "The effect is signed so that positive is the claim's direction. Verdict rule: **supported** "
              "if the 95% interval lies above zero, **contradicted** if below, **inconclusive** if it "
              "holds zero.", "", table, "",
              "Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + ".", "",
              "How each interval was computed, and what would settle an inconclusive claim:", ""]
        md += [f"- {c['claim']}: {c['method'] or 'not measured'}." +
               (f" To settle: {c['settle']}." if c.get("settle") else "") for c in claims]
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "claims.json"), json.dumps(claims, indent=2) + "\n")
        atomic_write_text(os.path.join(out, "claims.md"), "\n".join(md) + "\n")
    except USER_ERRORS as e:
        sys.exit(error_line(e))
    print(table)
    print(f"\n{out}/claims.json, claims.md: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))


if __name__ == "__main__":
    main()
