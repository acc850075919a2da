"""lab/data_size.py: how many examples does fine-tuning need? Triage accuracy against the number of distinct
training conversations, each set trained for the same number of epochs, for LoRA and for full fine-tuning.

The claim "thousands of examples, not trillions of tokens" (claim 11) is read from lab/headline.py, whose
full fine-tuning sees 800 distinct conversations, with 3 seeds x 250 items: at equal epochs this sweep's
1,600 set alone is 400 full fine-tuning steps, 2-3 hours a seed on one thread of a 2-core AVX2 CPU in
float32. This one asks how many: the curve. Every run passes over its own set --epochs times (a size-n set
takes epochs x n / batch optimizer steps), so a larger set is both more varied and more training, as it is
when someone collects more data. (At equal steps instead, a 400 and a
1,600 set would show the model the same 256 conversations: the same experiment twice.) Each model answers
the same held-out triage messages, greedy, scored by the task's own rules: exact match of all four labels,
each label alone, and the share of valid one-line JSON. Each (method, size, seed) run is cached with its
per-item scores; the base model is untrained and greedy, so it is scored once. A run also checkpoints every
25 steps (cache/data_size/<run>.partial, deleted when it finishes): full fine-tuning on 1,600 is hours on a
CPU, and a sitting that ends mid-run loses at most 25 steps.

    python lab/data_size.py --seeds 1337,1338,1339 --dtype bfloat16   # SmolLM2 -> results/data_size.*
    python lab/data_size.py --sizes 50,200 --epochs 3 --methods lora
    python lab/data_size.py --quick --out /tmp/lab   # a tiny random model, seconds (what CI runs)
"""

import math
import random
import time
from dataclasses import dataclass

from common import (LabConfig, Resume, cached_runs, finetune, merge_seeds, parse, rate_bars, rate_text, run,
                    run_path, save_results, scored, seed_list, setup, train_config, training_settings)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items
from tasks.triage import TRIAGE_FIELDS


@dataclass
class Config(LabConfig):
    sizes: str = cli.opt("25,100,400,1600", "distinct training conversations per run (comma-separated)",
                         group="experiment")
    epochs: float = cli.opt(2.0, "passes over each training set (steps = epochs x size / batch, at least 2)",
                            above=0)
    methods: str = cli.opt("lora,full", "lora, full or both (lr: train.py's defaults, 5e-4 and 5e-5)")


def steps_for(cfg, n):
    """Optimizer steps of a size-n run: --epochs passes over it at --batch-size."""
    return max(2, math.ceil(cfg.epochs * n / cfg.batch_size))


METRICS = ("exact_match", "valid", *TRIAGE_FIELDS, "final_loss", "train_s")


def main(argv=None):
    cfg = parse(Config, "Triage accuracy against the number of training conversations, at equal epochs.", argv)
    methods = cfg.methods.split(",")
    if not cfg.sizes.replace(",", "").isdigit() or not set(methods) <= {"lora", "full"}:
        raise ValueError(f"--sizes {cfg.sizes} --methods {cfg.methods}: expected sizes like 25,100 and methods "
                         "lora, full or lora,full")
    sizes = [int(s) for s in cfg.sizes.split(",")]
    if cfg.quick:
        sizes, cfg.epochs = [4, 16], 0.5
    lab = setup(cfg)
    pool = load_items("triage", "train", 0)[0]
    random.Random(cfg.seed).shuffle(pool)  # a size-n set is the first n of one shuffle: each set holds the smaller
    test = load_items("triage", "test", cfg.eval_items)[0]

    def measure(model, desc, losses=(), train_s=0.0):
        s, out = scored(lab, model, test, desc=desc)
        return {"exact_match": s["exact_match"], "valid": s["valid"], **s["fields"], "items": s["items"],
                "replies": out,
                "final_loss": sum(losses[-4:]) / max(1, len(losses[-4:])),
                "train_s": train_s}

    rows = []
    for method, n in [("base (no tuning)", 0)] + [(m, n) for m in methods for n in sizes]:
        key = f"{method}-n{n}-{cfg.epochs:g}epochs-{len(test)}items-data{cfg.seed}"

        def run_one(seed):
            if n == 0:
                return measure(lab.base, "base")
            t0 = time.time()
            # a 1,600 run is hours on a CPU: checkpointed, it continues in the next sitting
            resume = Resume(run_path(lab, "data_size", key, seed) + ".partial")
            model, losses = finetune(lab, [r["messages"] for r in pool[:n]], steps_for(cfg, n),
                                     full=method == "full", desc=f"{method} n={n} s{seed}", seed=seed,
                                     resume=resume)
            train_s = resume.earlier_s + time.time() - t0  # every sitting's, to the end of training
            return measure(model, f"{method} n={n}", losses, train_s)

        row = merge_seeds(cached_runs(lab, "data_size", key, run_one, same_for_every_seed=n == 0), METRICS)
        row["fields"] = {f: row[f] for f in TRIAGE_FIELDS}
        steps = steps_for(cfg, n) if n else 0
        rows.append({"method": method, "n_train": n, "epochs": cfg.epochs if n else 0.0, "steps": steps, **row})
        print(f"{method} n={n}: exact {row['exact_match']:.0%}, valid {row['valid']:.0%} over {len(row['seeds'])} "
              f"seed(s)")

    table = markdown_table(
        ["method", "conversations", "steps", "exact match [95%]", "valid JSON [95%]"] + list(TRIAGE_FIELDS) +
        ["train loss (last 4)", "train s"],
        [[r["method"], r["n_train"], r["steps"], rate_text(r, "exact_match"), rate_text(r, "valid")] +
         [rate_text(r, f) for f in TRIAGE_FIELDS] +
         ["—" if not r["n_train"] else f"{r['final_loss']:.3f}", f"{r['train_s']:.0f}"] for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, color in zip(methods, ("C0", "C1")):
        pts = [r for r in rows if r["method"] == method]
        for metric, fmt, label in (("exact_match", "o-", "exact match"), ("valid", "s--", "valid JSON")):
            rates, yerr = rate_bars(pts, metric)  # error bars: 95% over items and seeds (rate_interval)
            ax.errorbar([r["n_train"] for r in pts], rates, yerr=yerr, capsize=2, fmt=fmt, color=color,
                        alpha=1 if metric == "exact_match" else 0.6, label=f"{method}: {label}")
    ax.axhline(100 * rows[0]["exact_match"], color="gray", lw=1, label="base model: exact match")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes], minor=False)  # the sizes run, not log-scale decades
    ax.minorticks_off()
    ax.set_xlabel(f"distinct training conversations (each: {cfg.epochs:g} epochs at batch {cfg.batch_size})")
    ax.set_ylabel(f"% of {len(test)} test messages")
    ax.set_title("How many examples does fine-tuning need? (triage)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    settings = {"sizes": sizes, "epochs": cfg.epochs, "steps": {n: steps_for(cfg, n) for n in sizes},
                "batch": cfg.batch_size, "methods": methods,
                "warmup steps": {n: train_config(lab, steps_for(cfg, n)).warmup for n in sizes},
                f"training at {sizes[-1]}": {
                    m: training_settings(lab, steps_for(cfg, sizes[-1]), full=m == "full") for m in methods},
                "test items": len(test), "seeds": seed_list(cfg), "decoding": "greedy"}
    save_results(lab, "data_size", "fine-tuning needs thousands of examples, not trillions of tokens; how many?",
                 settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
