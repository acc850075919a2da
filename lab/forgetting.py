"""lab/forgetting.py: the learning/forgetting trade-off, for LoRA and full fine-tuning, across learning rates.

The claims: "catastrophic forgetting: train too hard on a narrow dataset and the model degrades at everything
else", and "conservative training". Biderman et al. (2024, "LoRA Learns Less and Forgets Less") put both
methods on one learning-vs-forgetting curve. Here: triage, three learning rates per method, each measured
after the same number of steps. Learned: triage exact match. Forgotten: KL(base || tuned) and
the perplexity change on general English (eval.py's measure), and on the instruct test set (a second
"everything else") both the exact-answer accuracy and, format-free, the likelihood of its reference replies
(teacher-forced NLL per item: the base model answers only ~2% of 250 exactly, too few for accuracy to fall
measurably, but every item's likelihood can). One often-recommended mitigation is measured too: a share
of general instruction data (the instruct mix) mixed into the training set. Each (run, seed) is cached as it
finishes with per-item scores (triage, instruct, reference NLL, general-text windows), measured at the end.

    python lab/forgetting.py --seeds 1337,1338,1339 --dtype bfloat16   # SmolLM2 -> results/forgetting.*
    python lab/forgetting.py --lora-lrs 1e-4,1e-3 --full-lrs 1e-5,1e-4 --steps 40
    python lab/forgetting.py --quick --out /tmp/lab  # a tiny random model, seconds (what CI runs)
"""

import random
from dataclasses import dataclass

from common import (LabConfig, cached_runs, finetune, forgot, general_windows, merge_seeds, parse, rate_text,
                    reply_nll, run, save_results, scored, seed_list, setup, training_settings, window_nll)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items


@dataclass
class Config(LabConfig):
    lora_lrs: str = cli.opt("1e-4,5e-4,2e-3", "LoRA learning rates (comma-separated; empty: none)", group="experiment")
    full_lrs: str = cli.opt("1e-5,5e-5,2e-4", "full fine-tuning learning rates (comma-separated; empty: none)")
    steps: int = cli.opt(32, "optimizer steps of every run", min=2)
    mix: float = cli.opt(0.25, "mitigation: share of instruct conversations mixed into triage (LoRA 5e-4, full "
                         "5e-5; 0: not run)", min=0)


METRICS = ("exact_match", "valid", "instruct_accuracy", "instruct_nll", "general_nll", "kl", "perplexity_change")


def main(argv=None):
    cfg = parse(Config, "Task accuracy against forgetting, LoRA and full fine-tuning, across learning rates.",
                argv)
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

    def measure(model, name):
        s, triage_replies = scored(lab, model, test, desc=name)
        o, instruct_replies = scored(lab, model, others, task="instruct", max_new_tokens=32, desc=f"{name} instruct")
        f = forgot(lab, model, windows)
        nll, general = reply_nll(lab, model, others), window_nll(lab, model, windows)
        return {"exact_match": s["exact_match"], "valid": s["valid"], "instruct_accuracy": o["accuracy"],
                "instruct_nll": sum(nll) / len(nll), "general_nll": sum(general) / len(general),
                "kl": f["kl_base_tuned"], "perplexity_change": f["perplexity_change"],
                "items": {"exact_match": s["items"]["exact_match"], "valid": s["items"]["valid"],
                          "instruct_accuracy": o["items"]["exact_match"], "instruct_nll": nll,
                          "general_nll": general},
                "replies": {"triage": triage_replies, "instruct": instruct_replies}}

    runs = [("base", "base", 0.0, None)]
    runs += [(f"lora lr {float(lr):g}", "lora", float(lr), triage) for lr in cfg.lora_lrs.split(",") if lr]
    runs += [(f"full lr {float(lr):g}", "full", float(lr), triage) for lr in cfg.full_lrs.split(",") if lr]
    if cfg.mix > 0:
        runs += [(f"{m} lr {lr:g} + {cfg.mix:.0%} instruct", m, lr, mixed) for m, lr in (("lora", 5e-4), ("full", 5e-5))]
    rows = []
    for name, method, lr, convs in runs:
        def run_one(seed):
            if convs is None:
                return measure(lab.base, name)
            model, _ = finetune(lab, convs, cfg.steps, desc=f"{name} s{seed}", full=method == "full", lr=lr,
                                seed=seed)
            return measure(model, name)

        key = f"{name}-{cfg.steps}steps-{len(test)}+{len(others)}items-mix{cfg.mix}-data{cfg.seed}"
        row = merge_seeds(cached_runs(lab, "forgetting", key, run_one, same_for_every_seed=convs is None), METRICS)
        rows.append({"run": name, "method": method, "lr": lr, "step": cfg.steps if convs else 0, **row})
        print(f"{name}: exact {row['exact_match']:.0%}, instruct NLL {row['instruct_nll']:.3f}, KL {row['kl']:.4f}")

    table = markdown_table(["run", "triage exact [95%]", "valid JSON", "instruct accuracy [95%]",
                            "instruct reply NLL", "general-text NLL", "KL(base‖tuned)", "perplexity change"],
                           [[r["run"], rate_text(r, "exact_match"), rate_text(r, "valid"),
                             rate_text(r, "instruct_accuracy"), f"{r['instruct_nll']:.3f}", f"{r['general_nll']:.3f}",
                             f"{r['kl']:.4f}", f"{r['perplexity_change']:+.1%}"] for r in rows])
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, label) in zip(axes, (("kl", "forgetting: KL(base‖tuned) on general text"),
                                       ("instruct_nll", "instruct reference-reply NLL (nats/token)"))):
        for method, color in (("lora", "C0"), ("full", "C1")):
            for mixed_in, marker in ((False, "o-"), (True, "*")):
                pts = [r for r in rows if r["method"] == method and ("instruct" in r["run"]) == mixed_in]
                if not pts:
                    continue
                xerr = [[r[key] - min(r["per_seed"][key]) for r in pts], [max(r["per_seed"][key]) - r[key] for r in pts]]
                yerr = [[100 * (r["exact_match"] - min(r["per_seed"]["exact_match"])) for r in pts],
                        [100 * (max(r["per_seed"]["exact_match"]) - r["exact_match"]) for r in pts]]
                ax.errorbar([r[key] for r in pts], [100 * r["exact_match"] for r in pts], xerr=xerr, yerr=yerr,
                            fmt=marker, color=color, capsize=2, ms=10 if mixed_in else 5,
                            label=f"{method}{' + instruct mix' if mixed_in else ''}")
                for r in pts:
                    ax.annotate(f"lr {r['lr']:g}", (r[key], 100 * r["exact_match"]), fontsize=7)
        ax.axvline(rows[0][key], color="gray", lw=1, label="base model")
        ax.set(xlabel=label + " (bars: seed range)", ylabel="triage exact match (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    settings = {"lora lrs": cfg.lora_lrs, "full lrs": cfg.full_lrs, "steps": cfg.steps, "batch": cfg.batch_size,
                "training (lr varies)": training_settings(lab, cfg.steps), "triage test items": len(test),
                "instruct test items": len(others), "mix": cfg.mix, "seeds": seed_list(cfg),
                "forgetting text": f"data/general.txt, {sum(w[1].numel() for w in windows)} tokens in "
                                   f"{len(windows)} windows"}
    save_results(lab, "forgetting", "train too hard on a narrow dataset and the model degrades at everything else; "
                 "LoRA learns less and forgets less", settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
