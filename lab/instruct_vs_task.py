"""lab/instruct_vs_task.py: instruction tuning vs task tuning, and what each does to the other's tasks.

The claims: instruction tuning (a broad mix, as in FLAN) teaches "the general skill of following
instructions", while task tuning squeezes "maximum reliability on that one thing". Three fine-tunes of the
same base model, equal steps: on the instruct mix, on triage, and on both mixed half and half. The instruct
mix is regenerated in memory (tasks/instruct.py, seed 0) with FAR_HELD_OUT held out of training: whole skills
(changing letter case, acronyms, dates) that no training family practises, so "held out" means a different
skill, not the sibling of a trained one (the shipped files keep their own held-out families). Every model,
and the base model, is scored on the instruct families seen in training, the held-out ones, and triage
(--eval-items of each: the default 250 is every seen and held-out item, 220 and 200, and triage's 250).
Each (model, seed) is cached with per-item scores; the base model is untrained and greedy: scored once.

    python lab/instruct_vs_task.py --seeds 1337,1338,1339 --dtype bfloat16   # -> results/instruct_vs_task.*
    python lab/instruct_vs_task.py --steps 60 --full
    python lab/instruct_vs_task.py --quick --out /tmp/lab   # a tiny random model, seconds (what CI runs)
"""

import random
from dataclasses import dataclass

from common import (LabConfig, cached_runs, finetune, grouped_bars, merge_seeds, parse, rate_text, run,
                    save_results, scored, seed_list, setup, training_settings)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items
from tasks.instruct import FAR_HELD_OUT, build_instruct


@dataclass
class Config(LabConfig):
    steps: int = cli.opt(48, "optimizer steps of every run", group="experiment", min=1)
    full: bool = cli.opt(False, "full fine-tuning instead of LoRA")


COLS = ("instruct_seen", "instruct_held_out", "triage_exact", "triage_valid")


def main(argv=None):
    cfg = parse(Config, "Instruction tuning vs task tuning vs both: seen and held-out instructions, and triage.",
                argv)
    if cfg.quick:
        cfg.steps = 2
    lab = setup(cfg)
    rng = random.Random(cfg.seed)  # the mixed set is drawn once (--seed); --seeds vary LoRA init and order
    instruct = build_instruct(held_out=FAR_HELD_OUT)
    triage = [r["messages"] for r in load_items("triage", "train", 0)[0]]
    tuning = [r["messages"] for r in instruct["train"]]
    n = min(len(tuning), len(triage))
    both = rng.sample(tuning, n // 2) + rng.sample(triage, n // 2)
    rng.shuffle(both)
    seen = [r for r in instruct["test"] if r["family"] not in FAR_HELD_OUT][:cfg.eval_items]
    held = [r for r in instruct["test"] if r["family"] in FAR_HELD_OUT][:cfg.eval_items]
    triage_test = load_items("triage", "test", cfg.eval_items)[0]

    def measure(model, name):
        a, seen_replies = scored(lab, model, seen, task="instruct", max_new_tokens=32, desc=f"{name}: seen")
        b, held_replies = scored(lab, model, held, task="instruct", max_new_tokens=32, desc=f"{name}: held out")
        t, triage_replies = scored(lab, model, triage_test, desc=f"{name}: triage")
        return {"instruct_seen": a["accuracy"], "instruct_held_out": b["accuracy"], "triage_exact": t["exact_match"],
                "triage_valid": t["valid"], "held_out_families": {f: v["accuracy"] for f, v in b["families"].items()},
                "items": {"instruct_seen": a["items"]["exact_match"], "instruct_held_out": b["items"]["exact_match"],
                          "triage_exact": t["items"]["exact_match"], "triage_valid": t["items"]["valid"]},
                "replies": {"instruct_seen": seen_replies, "instruct_held_out": held_replies,
                            "triage": triage_replies}}

    rows = []
    for name, convs in (("base (no tuning)", None), ("instruction-tuned", tuning), ("task-tuned (triage)", triage),
                        ("both, mixed", both)):
        def run_one(seed):
            if convs is None:
                return measure(lab.base, name)
            return measure(finetune(lab, convs, cfg.steps, desc=f"{name} s{seed}", full=cfg.full, seed=seed)[0], name)

        items = f"{len(seen)}+{len(held)}+{len(triage_test)}items"
        key = f"{name}-{cfg.steps}steps-{items}-full{int(cfg.full)}-data{cfg.seed}"
        runs = cached_runs(lab, "instruct_vs_task", key, run_one, same_for_every_seed=convs is None)
        row = merge_seeds(runs, COLS)
        families = runs[0]["held_out_families"]
        row["held_out_families"] = {f: sum(r["held_out_families"][f] for r in runs) / len(runs) for f in families}
        rows.append({"model": name, **row})
        print(f"{name}: seen {row['instruct_seen']:.0%}, held out {row['instruct_held_out']:.0%}, "
              f"triage {row['triage_exact']:.0%} over {len(runs)} seed(s)")

    labels = ("instruct, seen families", "instruct, held-out skills", "triage exact match", "triage valid JSON")
    table = markdown_table(["model"] + [f"{x} [95%]" for x in labels],
                           [[r["model"]] + [rate_text(r, c) for c in COLS] for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    grouped_bars(ax, rows, COLS, labels, "model")
    ax.set_ylabel("% correct")
    ax.set_title(f"Instruction tuning vs task tuning ({cfg.steps} steps each)")
    ax.legend(fontsize=8)
    settings = {"steps": cfg.steps, "batch": cfg.batch_size, "held-out skills": list(FAR_HELD_OUT),
                "training": training_settings(lab, cfg.steps, full=cfg.full), "seen items": len(seen),
                "held-out items": len(held), "triage items": len(triage_test), "seeds": seed_list(cfg),
                "decoding": "greedy"}
    save_results(lab, "instruct_vs_task", "instruction tuning teaches following instructions in general; task "
                 "tuning buys reliability on one task", settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
