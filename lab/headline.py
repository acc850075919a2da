"""lab/headline.py: the README's first table: does fine-tuning work, and what does it cost?

SmolLM2-135M-Instruct on triage, as the README's `python train.py` commands train it: LoRA (r=16, lr 5e-4) and
full fine-tuning (lr 5e-5), 100 steps of 8 conversations each (800 examples, about a quarter of an epoch),
warmup 10, beside the untrained base model. For each: exact match, valid JSON and each field, per item with
95% intervals; the perplexity change and KL(base || tuned) on general text (eval.py's forgetting measure);
the bytes the run stores (a PEFT adapter or a whole model) and its training time. Few-shot prompting and
retrieval, the cheaper rungs, are measured by the ladder (lab/ladder.sh). Each (method, seed) run is cached
as it finishes.

    python lab/headline.py --seeds 1337,1338,1339 --dtype bfloat16   # SmolLM2 -> results/headline.*
    python lab/headline.py --quick --out /tmp/lab   # a tiny random model, seconds (what CI runs)
"""

import tempfile
import time
from dataclasses import dataclass

from common import (LabConfig, cached_runs, finetune, forgot, general_windows, grouped_bars, merge_seeds,
                    parse, rate_text, run, save_results, scored, seed_list, setup, training_settings)

import lora
from model import save_pretrained
from plumbing import cli
from plumbing.intervals import mean_interval
from plumbing.plots import pyplot
from plumbing.report import human_bytes, markdown_table
from plumbing.stats import dir_bytes
from tasks import load_items
from tasks.triage import TRIAGE_FIELDS


@dataclass
class Config(LabConfig):
    steps: int = cli.opt(100, "optimizer steps of each fine-tuning run", min=2, group="experiment")
    warmup: int = cli.opt(10, "learning-rate warmup steps (the README's commands: 10 of 100)", min=0)


RATES = ("exact_match", "valid", *TRIAGE_FIELDS)
METRICS = (*RATES, "perplexity", "perplexity_change", "kl", "stored_bytes", "train_s")


def across_seeds(row, metric, fmt):
    """A tuned run's mean over seeds with its 95% t interval across them: "+8.9% [+7.2, +10.6]"."""
    m, low, high = mean_interval(row["per_seed"][metric])
    return f"{fmt(m)} [{fmt(low)}, {fmt(high)}]" if len(row["per_seed"][metric]) > 1 else fmt(m)


def main(argv=None):
    cfg = parse(Config, "Base model, LoRA and full fine-tuning on triage: accuracy, forgetting, bytes, time.", argv)
    if cfg.quick:
        cfg.steps, cfg.warmup = 2, 0
    lab = setup(cfg)
    train_convs = [r["messages"] for r in load_items("triage", "train", 0)[0]]
    test = load_items("triage", "test", cfg.eval_items)[0]
    windows = general_windows(lab, 256 if cfg.quick else 4096)
    runs = (("base (no tuning)", "base"), ("LoRA (r=16, lr 5e-4)", "lora"), ("full fine-tune (lr 5e-5)", "full"))
    rows = []
    for name, method in runs:
        def run_one(seed):
            model, stored, train_s = lab.base, 0, 0.0
            if method != "base":
                t0 = time.time()
                model, _ = finetune(lab, train_convs, cfg.steps, desc=f"{name} s{seed}", full=method == "full",
                                    warmup=cfg.warmup, seed=seed)
                train_s = time.time() - t0
                with tempfile.TemporaryDirectory() as d:  # what the run stores: a whole model, or an adapter
                    save_pretrained(model, d) if method == "full" else lora.save_adapter(model, d)
                    stored = dir_bytes(d)
            s, out = scored(lab, model, test, desc=name)
            f = forgot(lab, model, windows)
            return {"exact_match": s["exact_match"], "valid": s["valid"], **s["fields"], "items": s["items"],
                    "perplexity": f["tuned_perplexity"], "perplexity_change": f["perplexity_change"],
                    "kl": f["kl_base_tuned"], "stored_bytes": stored, "train_s": train_s, "replies": out}

        key = f"{name}-{cfg.steps}steps-warmup{cfg.warmup}-{len(test)}items"
        row = merge_seeds(cached_runs(lab, "headline", key, run_one, same_for_every_seed=method == "base"), METRICS)
        rows.append({"run": name, "tuned": method != "base", **row})
        print(f"{name}: exact {row['exact_match']:.0%}, valid {row['valid']:.0%}, KL {row['kl']:.4f}")

    table = markdown_table(
        ["run", "exact match [95%]", "valid JSON [95%]", *TRIAGE_FIELDS, "perplexity, general text",
         "KL(base ‖ tuned)", "stored", "train time"],
        [[r["run"], *(rate_text(r, m) for m in RATES),
          f"{r['perplexity']:.1f}" + (f" ({across_seeds(r, 'perplexity_change', '{:+.1%}'.format)})"
                                      if r["tuned"] else ""),
          across_seeds(r, "kl", "{:.3f}".format) if r["tuned"] else "—",
          human_bytes(r["stored_bytes"]) if r["tuned"] else "—", f"{r['train_s']:.0f} s" if r["tuned"] else "—"]
         for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    grouped_bars(ax, rows, RATES, ["exact match", "valid JSON", *TRIAGE_FIELDS], "run")
    ax.set(ylabel=f"% of {len(test)} test messages (95%)", title=f"{cfg.steps} steps of {cfg.batch_size}")
    ax.legend(fontsize=8)
    settings = {"steps": cfg.steps, "batch": cfg.batch_size, "test items": len(test), "seeds": seed_list(cfg),
                "runs": training_settings(lab, cfg.steps, warmup=cfg.warmup) + "; "
                + training_settings(lab, cfg.steps, full=True, warmup=cfg.warmup),
                "forgetting text": f"data/general.txt, {sum(w[1].numel() for w in windows)} tokens",
                "train time": "the fine-tuning call: copying the loaded base, tokenizing the training set, the steps"}
    save_results(lab, "headline", "100 fine-tuning steps teach a task the untrained model does not do, at a "
                 "small, measured cost (few-shot prompting and retrieval: lab/ladder.sh)", settings, rows, table,
                 fig, notes="Perplexity change and KL: mean over seeds [95% t interval across seeds]. Train "
                 "time: wall clock on the hardware above, shared with any other job running then.")


if __name__ == "__main__":
    run(main)
