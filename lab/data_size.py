"""lab/data_size.py: how many examples does fine-tuning need? Triage accuracy against the number of distinct
training conversations, at equal optimizer steps, for LoRA and for full fine-tuning.

The claim: fine-tuning needs "thousands of examples, not trillions of tokens". Every run takes the same
number of steps of the same batch, so every run sees the same number of conversations; only how many of
them are distinct changes (a small set is repeated for many epochs, a large one is not even seen once).
Each model answers the same held-out triage messages, greedy, scored by the task's own rules: exact match
of all four labels, and the share of replies that are valid one-line JSON.

    python lab/data_size.py                          # SmolLM2-135M-Instruct (offline GGUF) -> results/data_size.*
    python lab/data_size.py --sizes 50,200 --steps 20 --methods lora
    python lab/data_size.py --quick --out /tmp/lab   # a tiny random model, seconds (what CI runs)
"""

import random
import time
from dataclasses import dataclass

from common import LabConfig, finetune, parse, run, save_results, scored, setup, training_settings

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items


@dataclass
class Config(LabConfig):
    sizes: str = cli.opt("25,100,400,1600", "distinct training conversations per run (comma-separated)",
                         group="experiment")
    steps: int = cli.opt(32, "optimizer steps of every run", min=1)
    methods: str = cli.opt("lora,full", "lora, full or both (lr: train.py's defaults, 5e-4 and 5e-5)")


def main(argv=None):
    cfg = parse(Config, "Triage accuracy against the number of training conversations (LoRA and full).", argv)
    methods = cfg.methods.split(",")
    if not cfg.sizes.replace(",", "").isdigit() or not set(methods) <= {"lora", "full"}:
        raise ValueError(f"--sizes {cfg.sizes} --methods {cfg.methods}: expected sizes like 25,100 and methods "
                         "lora, full or lora,full")
    sizes = [int(s) for s in cfg.sizes.split(",")]
    if cfg.quick:
        sizes, cfg.steps = [4, 16], 2
    lab = setup(cfg)
    pool = load_items("triage", "train", 0)[0]
    random.Random(cfg.seed).shuffle(pool)  # a size-n set is the first n of one shuffle: each set holds the smaller
    test = load_items("triage", "test", cfg.eval_items)[0]

    base, _ = scored(lab, lab.base, test, desc="base")
    rows = [{"method": "base (no tuning)", "n_train": 0, "epochs": 0.0, "exact_match": base["exact_match"],
             "valid": base["valid"], "fields": base["fields"], "train_s": 0.0, "final_loss": None}]
    for method in methods:
        for n in sizes:
            t0 = time.time()
            model, losses = finetune(lab, [r["messages"] for r in pool[:n]], cfg.steps, full=method == "full",
                                     desc=f"{method} n={n}")
            seconds = time.time() - t0
            s, _ = scored(lab, model, test, desc=f"{method} n={n}")
            rows.append({"method": method, "n_train": n, "epochs": cfg.steps * cfg.batch_size / n,
                         "exact_match": s["exact_match"], "valid": s["valid"], "fields": s["fields"],
                         "train_s": seconds, "final_loss": sum(losses[-4:]) / len(losses[-4:])})
            print(f"{method} n={n}: exact {s['exact_match']:.0%}, valid {s['valid']:.0%}, {seconds:.0f} s")
            del model

    table = markdown_table(
        ["method", "conversations", "epochs", "exact match", "valid JSON", "mean field accuracy", "train loss (last 4)"],
        [[r["method"], r["n_train"], f"{r['epochs']:.2g}", f"{r['exact_match']:.0%}", f"{r['valid']:.0%}",
          f"{sum(r['fields'].values()) / 4:.0%}", "—" if r["final_loss"] is None else f"{r['final_loss']:.3f}"]
         for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, color in zip(methods, ("C0", "C1")):
        pts = [r for r in rows if r["method"] == method]
        ax.plot([r["n_train"] for r in pts], [100 * r["exact_match"] for r in pts], "o-", color=color,
                label=f"{method}: exact match")
        ax.plot([r["n_train"] for r in pts], [100 * r["valid"] for r in pts], "s--", color=color, alpha=0.6,
                label=f"{method}: valid JSON")
    ax.axhline(100 * base["exact_match"], color="gray", lw=1, label="base model: exact match")
    ax.set_xscale("log")
    ax.set_xlabel(f"distinct training conversations (every run: {cfg.steps} steps x {cfg.batch_size})")
    ax.set_ylabel(f"% of {len(test)} test messages")
    ax.set_title("How many examples does fine-tuning need? (triage)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    settings = {"sizes": sizes, "steps": cfg.steps, "batch": cfg.batch_size, "methods": methods,
                "training": {m: training_settings(lab, cfg.steps, full=m == "full") for m in methods},
                "test items": len(test), "decoding": "greedy"}
    save_results(lab, "data_size", "fine-tuning needs thousands of examples, not trillions of tokens; how many?",
                 settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
