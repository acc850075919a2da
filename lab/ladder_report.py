"""lab/ladder_report.py: the ladder's results as results/ladder/{ladder.json, README.md, ladder.png}.

Reads the eval.json reports that `python eval.py` wrote for runs on the knowledge task (and optionally a
behaviour task), and draws accuracy per rung: behaviour vs knowledge, before and after the store changed.

    python lab/ladder_report.py --report lora=out/know-lora/eval.json --report full=out/know-full/eval.json \
        --report triage-lora=out/triage/eval.json --out results/ladder
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import RUNGS  # noqa: E402
from plumbing.files import atomic_write_text  # noqa: E402
from plumbing.plots import pyplot, save_figure  # noqa: E402
from plumbing.report import RUNG_LABELS, human_bytes  # noqa: E402

QUESTIONS = {"v1": "store v1", "v2": "store v2 (changed)", "test": "test split"}


def accuracy(m):
    return m.get("accuracy", m.get("exact_match")) if not m.get("skipped") else None


def rows(name, report):
    """[(run, questions, rung, accuracy, stale, prompt tokens, stored bytes, update seconds)]."""
    out = []
    first = "v1" if report["task"] == "knowledge" else "test"  # a behaviour task has no store
    for which, ladder in ((first, report["ladder"]), ("v2", report.get("ladder_v2"))):
        for rung in RUNGS if ladder else ():
            m = ladder[rung]
            out.append((name, which, rung, accuracy(m), m.get("stale"), m.get("prompt_tokens"),
                        m.get("stored_bytes"), m.get("update_seconds")))
    return out


def markdown(table, reports):
    pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
    lines = ["| run | questions | rung | accuracy | stale | prompt tokens | stored | update |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run, which, rung, acc, stale, tokens, stored, update in table:
        label = RUNG_LABELS[rung].format(k=reports[run]["ladder"]["base_few_shot"].get("shots"))
        questions = QUESTIONS[which]
        if tokens is None:
            lines.append(f"| {run} | {questions} | {label} | skipped | | | | |")
            continue
        seconds = "—" if update is None else f"{update:,.3g} s"
        lines.append(f"| {run} | {questions} | {label} | {pct(acc)} | {pct(stale)} | {tokens:,.0f} | "
                     f"{human_bytes(stored)} | {seconds} |")
    return "\n".join(lines)


def plot(table, path):
    plt = pyplot()
    groups = sorted({(run, which) for run, which, *_ in table}, key=lambda g: (g[0], g[1]))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(groups)
    for j, (run, which) in enumerate(groups):
        acc = {rung: a for r, w, rung, a, *_ in table if (r, w) == (run, which)}
        xs = [i + j * width for i in range(len(RUNGS))]
        ax.bar(xs, [100 * (acc.get(r) or 0) for r in RUNGS], width,
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
    p.add_argument("--report", action="append", required=True, metavar="NAME=PATH", help="an eval.json, named")
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
                reports[name] = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --report {path}: cannot read it as JSON ({e}); run python eval.py first")
        if not isinstance(reports[name], dict) or "ladder" not in reports[name]:
            sys.exit(f"error: --report {path}: not an eval.py report (no ladder); run python eval.py first")
    table = [row for name, rep in reports.items() for row in rows(name, rep)]
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "ladder.json"), json.dumps(
        {"rows": [dict(zip(("run", "questions", "rung", "accuracy", "stale", "prompt_tokens", "stored_bytes",
                            "update_seconds"), r)) for r in table],
         "reports": {n: {k: r[k] for k in ("model", "tuned", "kind", "data", "split", "task", "n_items", "device",
                                             "dtype", "train")} for n, r in reports.items()}}, indent=2) + "\n")
    atomic_write_text(os.path.join(args.out, "README.md"), (args.note + "\n\n" if args.note else "") +
                      markdown(table, reports) + "\n\n![ladder](ladder.png)\n")
    plot(table, os.path.join(args.out, "ladder.png"))
    print(markdown(table, reports))


if __name__ == "__main__":
    main()
