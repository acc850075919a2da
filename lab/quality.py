"""lab/quality.py: small and clean against large and messy, at equal compute.

The claim: "small, clean, diverse datasets and conservative training beat large messy ones" (LIMA's 1,000
curated examples; AlpaGasus' 9k filtered beating 52k). Four triage training sets, each trained for the same
number of steps of the same batch (equal compute), then scored on the same held-out messages:

    clean small   N_SMALL distinct conversations from the built-in train split
    noisy large   N_LARGE conversations, NOISE of them with one label changed to another value at random
    repetitive    N_SMALL conversations: N_SMALL / REPEATS narrow messages (one problem sentence per category,
                  two names, one way to name each product, no greeting or sign-off: tasks/triage.py's
                  knobs), each REPEATS times
    clean large   N_LARGE distinct conversations from the built-in train split

The pairs separate the three things "messy" mixes: size (clean small vs clean large), label noise (clean
large vs noisy large) and repetition of narrow data (clean small vs repetitive: same size, same steps). The
run sees STEPS x batch conversations, about one pass over the small sets, so every repeat of a repetitive
message is seen (REPEATS times), while the large sets are sampled a tenth of the way through: at equal
compute "large" buys diversity, not more updates. Exact duplicates are kept as given (train.py would drop
them: dedup): the experiment measures the data.

    python lab/quality.py                            # SmolLM2-135M-Instruct, LoRA -> results/quality.*
    python lab/quality.py --steps 60 --noise 0.5
    python lab/quality.py --quick --out /tmp/lab     # a tiny random model, seconds (what CI runs)
"""

import json
import random
import time
from dataclasses import dataclass

from common import (LabConfig, cached_runs, finetune, merge_seeds, parse, rate_bars, rate_text, run,
                    save_results, scored, seed_list, setup, training_settings)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items
from tasks.triage import TRIAGE_FIELDS, TRIAGE_LABELS, build_triage, triage_reply


@dataclass
class Config(LabConfig):
    n_small: int = cli.opt(300, "conversations in the small sets", group="experiment", min=1)
    n_large: int = cli.opt(3000, "conversations in the large sets (at most the train split's 3000)", min=1)
    noise: float = cli.opt(0.3, "share of the noisy set with a wrong label", min=0)
    repeats: int = cli.opt(10, "copies of each message in the repetitive set", min=1)
    steps: int = cli.opt(40, "optimizer steps of every run (equal compute)", min=1)
    full: bool = cli.opt(False, "full fine-tuning instead of LoRA")


def with_wrong_label(conv, rng):
    """The conversation with one field of its label changed to another value of that field."""
    label = json.loads(conv[-1]["content"])
    field = rng.choice(TRIAGE_FIELDS)
    label[field] = rng.choice([v for v in TRIAGE_LABELS[field] if v != label[field]])
    return conv[:-1] + [{"role": "assistant", "content": triage_reply(label)}]


def datasets(cfg):
    """{name: list of conversations}, all drawn with cfg.seed."""
    rng = random.Random(cfg.seed)
    pool = [r["messages"] for r in load_items("triage", "train", 0)[0]]
    if not (cfg.n_small <= cfg.n_large <= len(pool) and 0 <= cfg.noise <= 1):
        raise ValueError(f"need --n-small <= --n-large <= {len(pool)} (the train split) and --noise in [0, 1]")
    rng.shuffle(pool)
    large = pool[:cfg.n_large]
    wrong = set(rng.sample(range(len(large)), round(cfg.noise * len(large))))
    narrow = build_triage(seed=cfg.seed, n_train=max(1, cfg.n_small // cfg.repeats), n_val=0, n_test=0,
                          templates=(0,), n_names=2, n_mentions=1, frame=False)["train"]
    return {"clean small": pool[:cfg.n_small],
            "noisy large": [with_wrong_label(c, rng) if i in wrong else c for i, c in enumerate(large)],
            "repetitive": [r["messages"] for r in narrow] * cfg.repeats,
            "clean large": large}


def main(argv=None):
    cfg = parse(Config, "Small and clean vs large and messy triage data, at equal compute.",
                argv)
    if cfg.quick:
        cfg.n_small, cfg.n_large, cfg.steps, cfg.repeats = 8, 32, 2, 4
    lab = setup(cfg)
    test = load_items("triage", "test", cfg.eval_items)[0]
    rows, metrics = [], ("exact_match", "valid", *TRIAGE_FIELDS, "final_loss")
    for name, convs in datasets(cfg).items():
        def run_one(seed):
            t0 = time.time()
            model, losses = finetune(lab, convs, cfg.steps, desc=f"{name} s{seed}", dedup=False,
                                     full=cfg.full, seed=seed)
            s, replies = scored(lab, model, test, desc=name)
            return {"exact_match": s["exact_match"], "valid": s["valid"], **s["fields"],
                    "final_loss": sum(losses[-4:]) / len(losses[-4:]), "train_s": time.time() - t0,
                    "items": s["items"], "replies": replies}

        key = (f"{name}-{cfg.n_small}-{cfg.n_large}-noise{cfg.noise}-x{cfg.repeats}-{cfg.steps}steps-"
               f"{len(test)}items-full{int(cfg.full)}-data{cfg.seed}")
        row = merge_seeds(cached_runs(lab, "quality", key, run_one), metrics)
        row["fields"] = {f: row[f] for f in TRIAGE_FIELDS}
        distinct = len({json.dumps(c) for c in convs})
        rows.append({"data": name, "conversations": len(convs), "distinct": distinct, **row})
        print(f"{name}: exact {row['exact_match']:.0%}, valid {row['valid']:.0%} over {len(row['seeds'])} seed(s)")

    table = markdown_table(
        ["data", "conversations", "distinct", "exact match [95%]", "valid JSON"] + list(TRIAGE_FIELDS) +
        ["train loss"],
        [[r["data"], r["conversations"], r["distinct"], rate_text(r, "exact_match"), rate_text(r, "valid")] +
         [rate_text(r, f) for f in TRIAGE_FIELDS] + [f"{r['final_loss']:.3f}"] for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(rows))
    for offset, metric, label in ((-0.2, "exact_match", "exact match"), (0.2, "valid", "valid JSON")):
        rates, yerr = rate_bars(rows, metric)  # error bars: 95% over items and seeds (rate_interval)
        ax.bar([x + offset for x in xs], rates, 0.4, label=label, yerr=yerr, capsize=2)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['data']}\n{r['conversations']:,} ({r['distinct']:,} distinct)" for r in rows], fontsize=8)
    ax.set_ylabel(f"% of {len(test)} test messages")
    ax.set_title(f"Equal compute: {cfg.steps} steps x {cfg.batch_size} conversations each")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    settings = {"n_small": cfg.n_small, "n_large": cfg.n_large, "noise": cfg.noise, "repeats": cfg.repeats,
                "steps": cfg.steps,
                "batch": cfg.batch_size, "training": training_settings(lab, cfg.steps, full=cfg.full),
                "test items": len(test), "seeds": seed_list(cfg), "decoding": "greedy"}
    save_results(lab, "quality", "small, clean, diverse data beats large, messy data", settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
