"""lab/self_generated.py: fine-tuning on the model's own replies, generation after generation.

The claim: "fine-tuning on model-generated data can amplify the base model's quirks rather than correct
them" (Shumailov et al. on OPT-125m: the distribution's tails vanish). Generation g is the base model
fine-tuned (LoRA) on the replies generation g-1 sampled for the same instruct prompts (generation 0: the
base model); a control is fine-tuned on the human replies. Measured: every generation's samples (the next
one's training data), and the held-out greedy replies of the base model, the last generation and the
control (the claim is read there, per item and seed; the middle generations are skipped, each scoring costs
a generation's training). Per reply: quirk share (one of the base model's 5 most frequent 3-word phrases in
its samples, less those the reference replies use), accuracy (exact answer), stops (end of turn before the
cap); per set: distinct-1/2, word entropy (bits), char repeats (1 - zlib ratio: high = loops like "!!!!").
Samples run to the end of turn under a generous cap; one that hits the cap is left out, never cut and closed
with an end token (that would teach shortness by itself). Each seed's chain is cached as it finishes.

    python lab/self_generated.py --seeds 1337,1338,1339 --dtype bfloat16   # SmolLM2 -> results/self_generated.*
    python lab/self_generated.py --quick --out /tmp/lab   # a tiny random model, seconds (what CI runs)
"""

from collections import Counter
from dataclasses import dataclass

from common import (LabConfig, StopRecorder, cached_runs, char_repeats, distinct, finetune, merge_seeds, parse,
                    prompts_of, rate_text, replies, run, save_results, seed_list, setup, training_settings,
                    trigrams, word_entropy)

from eval import split_reply
from model import Sampling
from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items, score


@dataclass
class Config(LabConfig):
    generations: int = cli.opt(5, "fine-tuned generations after the base model", group="experiment", min=1)
    prompts: int = cli.opt(64, "training prompts (instruct train split), one sampled reply each", min=1)
    temperature: float = cli.opt(0.7, "sampling temperature of the training replies", above=0)
    steps: int = cli.opt(16, "optimizer steps per generation (and for the control)", min=1)
    max_new_tokens: int = cli.opt(256, "cap of every reply (a sample that reaches it is left out)", min=1)
    n_quirks: int = cli.opt(5, "how many of the base model's frequent phrases to follow", min=1)
    keep_cut: bool = cli.opt(False, "train on samples cut at the cap too (biased; --quick: nothing stops)")


def measure(out, records, quirks, stopped):
    """Per-item scores (quirk, accuracy, stops) and the text measures (lab/common) of one model's replies."""
    items = {"quirk_share": [int(any(q in " ".join(t.lower().split()) for q in quirks)) for t in out],
             "accuracy": [int(score("instruct", reply, r)["exact"]) for reply, r in zip(out, records)],
             "stops": [int(s) for s in stopped]}
    return {**{k: sum(v) / len(v) for k, v in items.items()}, "distinct_1": distinct(out, 1),
            "distinct_2": distinct(out, 2), "entropy": word_entropy(out),
            "char_repeats": sum(map(char_repeats, out)) / len(out),
            "words": sum(len(t.split()) for t in out) / len(out), "items": items, "replies": out}


def chain(lab, cfg, seed, train_records, test):
    """One seed's chain: each generation's samples (0: the base model's) and the held-out replies of the base
    model, the last generation and the human-data control."""
    prompts, references = zip(*(split_reply(r["messages"]) for r in train_records))

    def answers(model, records, desc, sampling=Sampling(0.0, seed=0)):
        recorder = StopRecorder(lab.fmt.stop_ids)
        out = replies(lab, model, records, cfg.max_new_tokens, sampling, desc, replies_of=recorder)
        return out, [recorder.stopped[tuple(p)] for p in prompts_of(lab, records, cfg.max_new_tokens)]

    def sample(model, gen):  # the next generation's data: replies that ended by themselves, nothing cut
        out, stopped = answers(model, train_records, f"sample g{gen} s{seed}",
                               Sampling(cfg.temperature, seed=seed * 1000 + gen))
        kept = [p + [{"role": "assistant", "content": o}] for p, o, s in zip(prompts, out, stopped)
                if s or cfg.keep_cut]
        if len(kept) < cfg.batch_size:
            raise RuntimeError(f"generation {gen}: {len(kept)} of {len(out)} samples ended by themselves "
                               f"within --max-new-tokens {cfg.max_new_tokens}: raise it")
        return out, stopped, kept

    def held_out(model, gen, trained_on):
        out, stopped = answers(model, test, f"held out {'g' * isinstance(gen, int)}{gen} s{seed}")
        return {"measured": "held out", "generation": gen, "trained_on": trained_on,
                **measure(out, test, quirks, stopped)}

    samples, stopped, data = sample(lab.base, 0)
    in_refs = {g for ref in references for g in trigrams(ref)}  # phrases people write too are no quirks
    counts = Counter(g for t in samples for g in set(trigrams(t)) if g not in in_refs)
    quirks = [g for g, _ in counts.most_common(cfg.n_quirks)]
    rows = [held_out(lab.base, 0, 0)]
    for gen in range(1, cfg.generations + 1):
        rows.append({"measured": "samples", "generation": gen - 1, "trained_on": len(data),
                     **measure(samples, train_records, quirks, stopped)})
        model, _ = finetune(lab, data, cfg.steps, desc=f"train g{gen} s{seed}", dedup=False, seed=seed)
        if gen < cfg.generations:
            samples, stopped, data = sample(model, gen)
        else:
            rows.append(held_out(model, gen, len(data)))
        del model
    control, _ = finetune(lab, [r["messages"] for r in train_records], cfg.steps, desc=f"control s{seed}",
                          seed=seed)
    rows.append(held_out(control, "human replies (control)", len(train_records)))
    return {"rows": rows, "quirks": quirks}


METRICS = ("quirk_share", "accuracy", "stops", "distinct_1", "distinct_2", "entropy", "char_repeats", "words",
           "trained_on")


def main(argv=None):
    cfg = parse(Config, "Fine-tuning on the model's own replies, generation after generation, vs a human-data "
                "control.", argv)
    if cfg.quick:
        cfg.generations, cfg.prompts, cfg.steps, cfg.max_new_tokens, cfg.keep_cut = 2, 8, 2, 8, True
    lab = setup(cfg)
    train_records = load_items("instruct", "train", cfg.prompts)[0]
    test = load_items("instruct", "test", cfg.eval_items)[0]
    key = (f"g{cfg.generations}-{cfg.prompts}prompts-t{cfg.temperature}-{cfg.steps}steps-cap{cfg.max_new_tokens}-"
           f"{len(test)}items-q{cfg.n_quirks}{'-cut' if cfg.keep_cut else ''}")
    runs = cached_runs(lab, "self_generated", key, lambda seed: chain(lab, cfg, seed, train_records, test))
    rows = []
    for i, first in enumerate(runs[0]["rows"]):
        row = merge_seeds([{"seed": r["seed"], **r["rows"][i]} for r in runs], METRICS)
        rows.append({"measured": first["measured"], "generation": first["generation"], **row,
                     "sample": first["replies"][0]})
    quirks = {r["seed"]: r["quirks"] for r in runs}
    plain = ("distinct_1", "distinct_2", "entropy", "char_repeats", "words")
    table = markdown_table(["replies", "generation", "trained on (replies kept)", "quirk share [95%]", "accuracy [95%]",
                            "stops [95%]", "distinct-1", "distinct-2", "entropy (bits)", "char repeats", "words"],
                           [[r["measured"], r["generation"], f"{r['trained_on']:.0f}"] +
                            [rate_text(r, c) for c in METRICS[:3]] + [f"{r[c]:.3f}" for c in plain] for r in rows])
    cols = ("quirk_share", "accuracy", "distinct_2", "entropy", "char_repeats", "stops")
    fig, axes = pyplot().subplots(1, len(cols), figsize=(17, 3.4))
    drawn = [r for r in rows if r["measured"] == "samples"]
    tested = [r for r in rows if r["measured"] == "held out" and isinstance(r["generation"], int)]
    for ax, c in zip(axes, cols):  # bars: the range over seeds
        for pts, fmt, label in ((drawn, "o-", "samples (training data)"), (tested, "s", "held out (greedy)")):
            spread = [[r[c] - min(r["per_seed"][c]) for r in pts], [max(r["per_seed"][c]) - r[c] for r in pts]]
            ax.errorbar([r["generation"] for r in pts], [r[c] for r in pts], yerr=spread, fmt=fmt, capsize=2,
                        label=label)
        ax.axhline(rows[-1][c], color="C2", ls="--", label="control (human), held out")
        ax.set(title=c.replace("_", " "), xlabel="generation")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    settings = {"generations": cfg.generations, "training prompts": cfg.prompts, "temperature": cfg.temperature,
                "steps": cfg.steps, "batch": cfg.batch_size, "training": training_settings(lab, cfg.steps) +
                ", from the base model every generation", "held-out prompts": len(test),
                "max_new_tokens": cfg.max_new_tokens, "quirk phrases per seed": quirks, "seeds": seed_list(cfg),
                "decoding": f"samples at temperature {cfg.temperature}, held-out replies greedy"}
    save_results(lab, "self_generated", "fine-tuning on model-generated data amplifies the base model's quirks",
                 settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
