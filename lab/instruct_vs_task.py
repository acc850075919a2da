"""lab/instruct_vs_task.py: instruction tuning vs task tuning, and what each does to the other's tasks.

The claims: instruction tuning (a broad mix, as in FLAN) teaches "the general skill of following
instructions", while task tuning squeezes "maximum reliability on that one thing". Three fine-tunes of the
same base model, equal steps: on the instruct mix, on triage, and on both mixed half and half. The instruct
mix is regenerated in memory (tasks/instruct.py, seed 0) with FAR_HELD_OUT held out of training: whole skills
(changing letter case, acronyms, dates) that no training family practises, so "held out" means a different
skill, not the sibling of a trained one (the shipped files keep their own held-out families). Every model,
and the base model, is scored on the instruct families seen in training, the held-out ones, and triage.

    python lab/instruct_vs_task.py                   # SmolLM2-135M-Instruct -> results/instruct_vs_task.*
    python lab/instruct_vs_task.py --steps 60 --full
    python lab/instruct_vs_task.py --quick --out /tmp/lab   # a tiny random model, seconds (what CI runs)
"""

import random
from dataclasses import dataclass

from common import (LabConfig, finetune, grouped_bars, parse, run, save_results, scored, setup,
                    training_settings)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items
from tasks.instruct import FAR_HELD_OUT, build_instruct


@dataclass
class Config(LabConfig):
    steps: int = cli.opt(48, "optimizer steps of every run", group="experiment", min=1)
    full: bool = cli.opt(False, "full fine-tuning instead of LoRA")


def main(argv=None):
    cfg = parse(Config, "Instruction tuning vs task tuning vs both: seen and held-out instructions, and triage.", argv)
    if cfg.quick:
        cfg.steps = 2
    lab = setup(cfg)
    rng = random.Random(cfg.seed)
    instruct = build_instruct(held_out=FAR_HELD_OUT)
    triage = [r["messages"] for r in load_items("triage", "train", 0)[0]]
    tuning = [r["messages"] for r in instruct["train"]]
    n = min(len(tuning), len(triage))
    both = rng.sample(tuning, n // 2) + rng.sample(triage, n // 2)
    rng.shuffle(both)
    per = max(1, cfg.eval_items // 2)  # items per instruct group
    seen = [r for r in instruct["test"] if r["family"] not in FAR_HELD_OUT][:per]
    held = [r for r in instruct["test"] if r["family"] in FAR_HELD_OUT][:per]
    triage_test = load_items("triage", "test", cfg.eval_items)[0]

    rows = []
    for name, convs in (("base (no tuning)", None), ("instruction-tuned", tuning), ("task-tuned (triage)", triage),
                        ("both, mixed", both)):
        model = lab.base if convs is None else finetune(lab, convs, cfg.steps, desc=name, full=cfg.full)[0]
        a, _ = scored(lab, model, seen, task="instruct", max_new_tokens=32, desc=f"{name}: seen")
        b, _ = scored(lab, model, held, task="instruct", max_new_tokens=32, desc=f"{name}: held out")
        t, _ = scored(lab, model, triage_test, desc=f"{name}: triage")
        rows.append({"model": name, "instruct_seen": a["accuracy"], "instruct_held_out": b["accuracy"],
                     "triage_exact": t["exact_match"], "triage_valid": t["valid"],
                     "held_out_families": {f: v["accuracy"] for f, v in b["families"].items()}})
        print(f"{name}: seen {a['accuracy']:.0%}, held out {b['accuracy']:.0%}, triage {t['exact_match']:.0%}")

    cols = ("instruct_seen", "instruct_held_out", "triage_exact", "triage_valid")
    labels = ("instruct, seen families", "instruct, held-out skills", "triage exact match", "triage valid JSON")
    table = markdown_table(["model"] + list(labels), [[r["model"]] + [f"{r[c]:.0%}" for c in cols] for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    grouped_bars(ax, rows, cols, labels, "model")
    ax.set_ylabel("% correct")
    ax.set_title(f"Instruction tuning vs task tuning ({cfg.steps} steps each)")
    ax.legend(fontsize=8)
    settings = {"steps": cfg.steps, "batch": cfg.batch_size, "held-out skills": list(FAR_HELD_OUT),
                "training": training_settings(lab, cfg.steps, full=cfg.full), "items": f"{len(seen)} seen, {len(held)} held out, "
                f"{len(triage_test)} triage", "decoding": "greedy"}
    save_results(lab, "instruct_vs_task", "instruction tuning teaches following instructions in general; task "
                 "tuning buys reliability on one task", settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
