"""lab/lora_rank.py: what each LoRA rank buys and what it costs, next to full fine-tuning.

The claims: "full fine-tuning ... produces a whole new copy of the model to store and serve", "LoRA trains a
tiny set of adapter weights". LoRA at ranks 1, 4, 16, 64 and full fine-tuning, equal steps on triage. Alpha
is one fixed number for every rank (the LoRA paper's convention: set once, not tuned per rank), so only the
rank changes between the LoRA runs; the first version set alpha = 2 x rank, which moved rank and the update's
scale together. For every run: trainable parameters, optimizer state bytes (AdamW keeps two moments per
trained weight), peak memory during training, mean step time, bytes on disk of what the run saves (the PEFT
adapter, or the whole model), triage exact match per item, and forgetting (KL(base || tuned) and the
perplexity change on general text, eval.py's measure). Each (method, seed) run is cached as it finishes.

    python lab/lora_rank.py --seeds 1337,1338,1339 --dtype bfloat16   # SmolLM2 -> results/lora_rank.*
    python lab/lora_rank.py --ranks 2,8 --steps 20
    python lab/lora_rank.py --quick --out /tmp/lab   # a tiny random model, seconds (what CI runs)
"""

import tempfile
import time
from dataclasses import dataclass

import torch
from common import (LabConfig, cached_runs, finetune, forgot, general_windows, merge_seeds, parse, rate_bars,
                    rate_text, run, save_results, scored, seed_list, setup, training_settings)

import lora
from model import save_pretrained
from plumbing import cli
from plumbing.benchmark import peak_memory, reset_peak_memory
from plumbing.plots import pyplot
from plumbing.report import human_bytes, markdown_table
from plumbing.stats import dir_bytes
from tasks import load_items


@dataclass
class Config(LabConfig):
    ranks: str = cli.opt("1,4,16,64", "LoRA ranks (comma-separated); full fine-tuning is always added",
                         group="experiment")
    steps: int = cli.opt(32, "optimizer steps of every run", min=1)
    alpha: float = cli.opt(16.0, "LoRA alpha, the same for every rank (the update is scaled by alpha / rank)",
                           above=0)


METRICS = ("trainable", "optimizer_bytes", "peak_bytes", "start_bytes", "step_s", "stored_bytes", "exact_match",
           "valid", "kl", "perplexity_change", "final_loss")


def main(argv=None):
    cfg = parse(Config, "LoRA at several ranks vs full fine-tuning: parameters, memory, time, disk, accuracy.", argv)
    ranks = [int(r) for r in cfg.ranks.split(",")]
    if cfg.quick:
        ranks, cfg.steps = [1, 4], 3
    lab = setup(cfg)
    train_convs = [r["messages"] for r in load_items("triage", "train", 0)[0]]
    test = load_items("triage", "test", cfg.eval_items)[0]
    windows = general_windows(lab, 256 if cfg.quick else 4096)
    rows = []
    for rank in ranks + [None]:
        name = "full" if rank is None else f"LoRA r={rank}"

        def run_one(seed):
            times, memory = [], {}

            def clock(step, model, losses, optimizer):  # every step: when it ended; AdamW's state after step 1
                times.append(time.perf_counter())
                if step == 1:
                    memory["optimizer"] = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                              for t in state.values() if torch.is_tensor(t))

            start_rss = reset_peak_memory(lab.rt)
            times.append(time.perf_counter())
            over = {"full": True} if rank is None else {"lora_rank": rank, "lora_alpha": cfg.alpha}
            model, losses = finetune(lab, train_convs, cfg.steps, on_step=clock, every=1, desc=f"{name} s{seed}",
                                     seed=seed, **over)
            peak, how = peak_memory(lab.rt)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            with tempfile.TemporaryDirectory() as d:  # what the run would store: adapter, or a whole model
                save_pretrained(model, d) if rank is None else lora.save_adapter(model, d)
                stored = dir_bytes(d)
            s, out = scored(lab, model, test, desc=name)
            f = forgot(lab, model, windows)
            steps_s = [b - a for a, b in zip(times[1:], times[2:])]  # step 1 (warm-up of the allocator) left out
            return {"trainable": trainable, "optimizer_bytes": memory["optimizer"], "peak_bytes": peak,
                    "peak_how": how, "start_bytes": start_rss, "step_s": sum(steps_s) / max(len(steps_s), 1),
                    "stored_bytes": stored, "exact_match": s["exact_match"], "valid": s["valid"],
                    "kl": f["kl_base_tuned"], "perplexity_change": f["perplexity_change"],
                    "final_loss": sum(losses[-4:]) / len(losses[-4:]), "items": s["items"],
                    "replies": out}

        alpha = "" if rank is None else f"-alpha{cfg.alpha:g}"
        runs = cached_runs(lab, "lora_rank", f"{name}{alpha}-{cfg.steps}steps-{len(test)}items", run_one)
        row = merge_seeds(runs, METRICS)
        rows.append({"method": name, "rank": rank, **row, "peak_how": runs[0]["peak_how"]})
        print(f"{name}: exact {row['exact_match']:.0%}, KL {row['kl']:.4f}, stored {human_bytes(row['stored_bytes'])}")

    table = markdown_table(
        ["method", "trainable", "optimizer state", "peak memory", "s/step", "stored", "exact match [95%]",
         "valid JSON [95%]", "KL(base‖tuned)", "perplexity change"],
        [[r["method"], f"{r['trainable']:,.0f}", human_bytes(r["optimizer_bytes"]), human_bytes(r["peak_bytes"]),
          f"{r['step_s']:.2f}", human_bytes(r["stored_bytes"]), rate_text(r, "exact_match"), rate_text(r, "valid"),
          f"{r['kl']:.4f}", f"{r['perplexity_change']:+.1%}"] for r in rows])
    plt = pyplot()
    fig, (ax_cost, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["method"] for r in rows]
    ax_cost.bar(labels, [r["stored_bytes"] / 2**20 for r in rows], color="C1")
    ax_cost.set(yscale="log", ylabel="MiB on disk (log)", title="What each run stores")
    rates, yerr = rate_bars(rows, "exact_match")  # error bars: 95% over items and seeds; KL: seed range
    ax_acc.errorbar(labels, rates, yerr=yerr, fmt="o-", capsize=3, label="triage exact match (%, 95%)")
    ax_kl = ax_acc.twinx()
    ax_kl.errorbar(labels, [r["kl"] for r in rows], fmt="s--", color="C3", capsize=3,
                   yerr=[[r["kl"] - min(r["per_seed"]["kl"]) for r in rows],
                         [max(r["per_seed"]["kl"]) - r["kl"] for r in rows]],
                   label="KL(base‖tuned), general text (seed range)")
    ax_acc.set(ylabel="exact match (%)", title=f"Learned vs forgotten ({cfg.steps} steps each)")
    ax_kl.set_ylabel("KL (nats per token)")
    for ax in (ax_cost, ax_acc):
        ax.tick_params(axis="x", labelsize=8)  # five method names side by side
    ax_acc.legend(loc="upper left", fontsize=8)
    ax_kl.legend(loc="lower right", fontsize=8)
    settings = {"ranks": ranks, "alpha": cfg.alpha, "steps": cfg.steps, "batch": cfg.batch_size,
                f"LoRA training (r={ranks[0]}'s; the others differ only in r)":
                    training_settings(lab, cfg.steps, lora_rank=ranks[0], lora_alpha=cfg.alpha),
                "full": training_settings(lab, cfg.steps, full=True), "test items": len(test),
                "forgetting text": f"data/general.txt, {sum(w[1].numel() for w in windows)} tokens",
                "peak memory": rows[0]["peak_how"], "seeds": seed_list(cfg)}
    save_results(lab, "lora_rank", "full fine-tuning stores a whole model; LoRA trains (and stores) tiny adapters",
                 settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
