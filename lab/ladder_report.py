"""lab/ladder_report.py: the ladder's results as results/ladder/{ladder.json, README.md, ladder.png}.

Reads the eval.json reports that `python eval.py` wrote for runs on the knowledge task (and optionally a
behaviour task), and draws accuracy per rung: behaviour vs knowledge, before and after the store changed.
A name given several reports (one per training seed) is one run: each rung's rate is the mean over its
reports, its 95% interval over items and seeds (lab/common.rate_interval), and its per-item scores are kept
(eval.py writes them) for lab/claims.py's paired comparisons.

    python lab/ladder_report.py --report lora=out/know-lora/eval.json --report full=out/know-full/eval.json \
        --report triage-lora=out/triage-s1/eval.json --report triage-lora=out/triage-s2/eval.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cpu_flags, git_commit, rate_interval, rate_text  # noqa: E402
from eval import RUNGS  # noqa: E402
from plumbing.files import atomic_write_text  # noqa: E402
from plumbing.plots import pyplot, save_figure  # noqa: E402
from plumbing.report import RUNG_LABELS, human_bytes  # noqa: E402

QUESTIONS = {"v1": "store v1", "v2": "store v2 (changed)", "test": "test split"}


def accuracy(m):
    return m.get("accuracy", m.get("exact_match")) if not m.get("skipped") else None


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def rung_items(m):
    """{"accuracy": [0/1 per item], "stale": [...] (knowledge)} of one rung: triage's and instruct's exact
    match is the rung's accuracy."""
    items = m["items"]
    out = {"accuracy": items.get("accuracy", items.get("exact_match"))}
    return {**out, "stale": items["stale"]} if "stale" in items else out


def rows(name, reports):
    """One dict per (questions, rung) of a run, merged over its reports (seeds): the mean rate, stale share,
    prompt tokens, stored bytes and update seconds, and per-item scores {"accuracy"/"stale": [[...] per seed]}
    when every report has them (eval.py since 2026-12-03)."""
    out = []
    first = "v1" if reports[0]["task"] == "knowledge" else "test"  # a behaviour task has no store
    for which, key in ((first, "ladder"), ("v2", "ladder_v2")):
        for rung in RUNGS if reports[0].get(key) else ():
            ms = [rep[key][rung] for rep in reports]
            row = {"run": name, "questions": which, "rung": rung, "accuracy": mean(map(accuracy, ms)),
                   "stale": mean(m.get("stale") for m in ms), "stored_bytes": ms[0].get("stored_bytes"),
                   "prompt_tokens": mean(m.get("prompt_tokens") for m in ms),
                   "update_seconds": mean(m.get("update_seconds") for m in ms), "seeds": len(ms)}
            if all("items" in m for m in ms):
                row["items"] = {k: [rung_items(m)[k] for m in ms] for k in rung_items(ms[0])}
            out.append(row)
    return out


def rate(row, metric):
    """ "35% [22, 50]": the mean rate with its 95% interval over items and seeds (or the rate alone)."""
    return "—" if row[metric] is None else rate_text(row, metric)


def markdown(table, reports):
    lines = ["| run | questions | rung | accuracy [95%] | stale [95%] | prompt tokens | stored | update | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        label = RUNG_LABELS[r["rung"]].format(k=reports[r["run"]][0]["ladder"]["base_few_shot"].get("shots"))
        questions = QUESTIONS[r["questions"]]
        if r["prompt_tokens"] is None:
            lines.append(f"| {r['run']} | {questions} | {label} | skipped | | | | | |")
            continue
        seconds = "—" if r["update_seconds"] is None else f"{r['update_seconds']:,.3g} s"
        lines.append(f"| {r['run']} | {questions} | {label} | {rate(r, 'accuracy')} | {rate(r, 'stale')} | "
                     f"{r['prompt_tokens']:,.0f} | {human_bytes(r['stored_bytes'])} | {seconds} | {r['seeds']} |")
    return "\n".join(lines)


def plot(table, path):
    plt = pyplot()
    groups = sorted({(r["run"], r["questions"]) for r in table})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(groups)
    for j, (run, which) in enumerate(groups):
        by_rung = {r["rung"]: r for r in table if (r["run"], r["questions"]) == (run, which)}
        heights, low, high = [], [], []
        for rung in RUNGS:  # error bars: 95% over items and seeds (where the report kept items)
            r = by_rung.get(rung) or {}
            acc = r.get("accuracy") or 0
            ci = (rate_interval(r, "accuracy") or (acc,) * 3)[1:]
            heights.append(100 * acc)
            low.append(100 * max(0.0, acc - ci[0]))
            high.append(100 * max(0.0, ci[1] - acc))
        ax.bar([i + j * width for i in range(len(RUNGS))], heights, width, yerr=[low, high], capsize=2,
               label=f"{run}, {QUESTIONS[which]}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(RUNGS))])
    ax.set_xticklabels([RUNG_LABELS[r].format(k="k") for r in RUNGS], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("The ladder on SmolLM2-135M-Instruct: same items, same scorer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main():
    p = argparse.ArgumentParser(description="Collect eval.py reports into results/ladder (json, md, png).")
    p.add_argument("--report", action="append", required=True, metavar="NAME=PATH",
                   help="an eval.json, named; the same name again adds another seed's report to that run")
    p.add_argument("--out", default="results/ladder", help="output directory")
    p.add_argument("--note", default="", help="text for the top of README.md (hardware, commands)")
    args = p.parse_args()
    reports = {}
    for item in args.report:
        name, _, path = item.partition("=")
        if not name or not path:
            sys.exit(f"error: --report {item}: expected NAME=PATH, e.g. lora=out/know-lora/eval.json")
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --report {path}: cannot read it as JSON ({e}); run python eval.py first")
        if not isinstance(report, dict) or "ladder" not in report:
            sys.exit(f"error: --report {path}: not an eval.py report (no ladder); run python eval.py first")
        if name in reports and report["n_items"] != reports[name][0]["n_items"]:
            sys.exit(f"error: --report {path}: {report['n_items']} items, but the other {name} reports have "
                     f"{reports[name][0]['n_items']}: seeds of one run must score the same items")
        reports.setdefault(name, []).append(report)
    table = [row for name, reps in reports.items() for row in rows(name, reps)]
    os.makedirs(args.out, exist_ok=True)
    meta = ("model", "tuned", "kind", "data", "split", "task", "n_items", "device", "dtype", "train")
    commit, flags = git_commit(), cpu_flags()
    provenance = (f"Merged at commit {commit}, CPU flags {', '.join(flags) or 'unknown'}. Each run as eval.py "
                  "recorded it: " + "; ".join(f"{n}: {len(reps)} seed(s), {reps[0]['device']}, {reps[0]['dtype']}"
                                              for n, reps in reports.items()) + ".")
    atomic_write_text(os.path.join(args.out, "ladder.json"), json.dumps(
        {"commit": commit, "cpu_flags": flags, "rows": table, "reports": {n: {**{k: reps[0][k] for k in meta}, "seeds": len(reps),
                                        "tuned_per_seed": [r["tuned"] for r in reps]} for n, reps in reports.items()}},
        indent=2) + "\n")
    atomic_write_text(os.path.join(args.out, "README.md"), (args.note + "\n\n" if args.note else "") +
                      provenance + "\n\n" + markdown(table, reports) + "\n\n![ladder](ladder.png)\n")
    plot(table, os.path.join(args.out, "ladder.png"))
    print(markdown(table, reports))


if __name__ == "__main__":
    main()
