"""lab/forgetting.py: the learning/forgetting trade-off, for LoRA and full fine-tuning, across learning rates.

The claims: "catastrophic forgetting: train too hard on a narrow dataset and the model degrades at everything
else", and "conservative training". Biderman et al. (2024, "LoRA Learns Less and Forgets Less") put both
methods on one learning-vs-forgetting curve. Here: triage, three learning rates per method, measured halfway
and at the end of the same number of steps. Learned: triage exact match. Forgotten: KL(base || tuned) and
the perplexity change on general English (eval.py's measure), and accuracy on a slice of the instruct test
set (a second "everything else": instructions the base model follows). One mitigation the README recommends
is measured too: a share of general instruction data (the instruct mix) mixed into the training set.

    python lab/forgetting.py                         # SmolLM2-135M-Instruct -> results/forgetting.*
    python lab/forgetting.py --lora-lrs 1e-4,1e-3 --full-lrs 1e-5,1e-4 --steps 40
    python lab/forgetting.py --quick --out /tmp/lab  # a tiny random model, seconds (what CI runs)
"""

import random
from dataclasses import dataclass

from common import (LabConfig, finetune, forgot, general_windows, parse, run, save_results, scored,
                    setup, training_settings)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items


@dataclass
class Config(LabConfig):
    lora_lrs: str = cli.opt("1e-4,5e-4,2e-3", "LoRA learning rates (comma-separated)", group="experiment")
    full_lrs: str = cli.opt("1e-5,5e-5,2e-4", "full fine-tuning learning rates")
    steps: int = cli.opt(32, "optimizer steps of every run (measured at half and at the end)", min=2)
    mix: float = cli.opt(0.25, "mitigation: share of instruct conversations mixed into triage (at the default lr)",
                         min=0)


def main(argv=None):
    cfg = parse(Config, "Task accuracy against forgetting, LoRA and full fine-tuning, across learning rates.", argv)
    if cfg.quick:
        cfg.lora_lrs, cfg.full_lrs, cfg.steps = "5e-4", "5e-5", 2
    lab = setup(cfg)
    rng = random.Random(cfg.seed)
    triage = [r["messages"] for r in load_items("triage", "train", 0)[0]]
    instruct = [r["messages"] for r in load_items("instruct", "train", 0)[0]]
    mixed = triage + rng.sample(instruct, round(cfg.mix / (1 - cfg.mix) * len(triage)) if cfg.mix < 1 else 0)
    rng.shuffle(mixed)
    test = load_items("triage", "test", cfg.eval_items)[0]
    others = load_items("instruct", "test", cfg.eval_items)[0]  # shuffled families; scored by exact answer
    windows = general_windows(lab, 256 if cfg.quick else 4096)

    def measure(run_name, method, lr, step, model):
        s, _ = scored(lab, model, test, desc=f"{run_name} @{step}")
        o, _ = scored(lab, model, others, task="instruct", max_new_tokens=32, desc=f"{run_name} instruct")
        f = forgot(lab, model, windows)
        return {"run": run_name, "method": method, "lr": lr, "step": step, "exact_match": s["exact_match"],
                "valid": s["valid"], "kl": f["kl_base_tuned"], "perplexity_change": f["perplexity_change"],
                "instruct_accuracy": o["accuracy"]}

    rows = [measure("base", "base", 0.0, 0, lab.base)]
    runs = [("lora", float(lr), triage) for lr in cfg.lora_lrs.split(",")] + \
           [("full", float(lr), triage) for lr in cfg.full_lrs.split(",")]
    runs += [(m, lr, mixed) for m, lr in (("lora", 5e-4), ("full", 5e-5))] if cfg.mix > 0 else []
    for method, lr, convs in runs:
        name = f"{method} lr {lr:g}" + (f" + {cfg.mix:.0%} instruct" if convs is mixed else "")
        finetune(lab, convs, cfg.steps, every=cfg.steps // 2, desc=name, full=method == "full", lr=lr,
                 on_step=lambda step, model, losses, opt: rows.append(measure(name, method, lr, step, model)))
        print(f"{name}: exact {rows[-1]['exact_match']:.0%}, KL {rows[-1]['kl']:.4f}")

    table = markdown_table(["run", "step", "triage exact", "valid JSON", "KL(base‖tuned)", "perplexity change",
                            "instruct accuracy"],
                           [[r["run"], r["step"], f"{r['exact_match']:.0%}", f"{r['valid']:.0%}", f"{r['kl']:.4f}",
                             f"{r['perplexity_change']:+.1%}", f"{r['instruct_accuracy']:.0%}"] for r in rows])
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, label) in zip(axes, (("kl", "forgetting: KL(base‖tuned) on general text"),
                                       ("instruct_accuracy", "instruct test accuracy (everything else)"))):
        for method, color in (("lora", "C0"), ("full", "C1")):
            end = [r for r in rows if r["method"] == method and r["step"] == cfg.steps and "instruct" not in r["run"]]
            ax.plot([r[key] for r in end], [100 * r["exact_match"] for r in end], "o-", color=color, label=method)
            for r in end:
                ax.annotate(f"lr {r['lr']:g}", (r[key], 100 * r["exact_match"]), fontsize=7)
            for r in rows:
                if r["method"] == method and r["step"] == cfg.steps and "instruct" in r["run"]:
                    ax.plot(r[key], 100 * r["exact_match"], "*", ms=12, color=color, label=f"{method} + instruct mix")
        ax.axvline(rows[0][key], color="gray", lw=1, label="base model")
        ax.set(xlabel=label, ylabel="triage exact match (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    settings = {"lora lrs": cfg.lora_lrs, "full lrs": cfg.full_lrs, "steps": cfg.steps, "batch": cfg.batch_size,
                "training (lr varies)": training_settings(lab, cfg.steps), "triage test items": len(test),
                "instruct test items": len(others), "mix": cfg.mix,
                "forgetting text": f"data/general.txt, {sum(w[1].numel() for w in windows)} tokens"}
    save_results(lab, "forgetting", "train too hard on a narrow dataset and the model degrades at everything else; "
                 "LoRA learns less and forgets less", settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
