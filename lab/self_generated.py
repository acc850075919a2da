"""lab/self_generated.py: fine-tuning on the model's own replies, generation after generation.

The claim: "fine-tuning on model-generated data can amplify the base model's quirks rather than correct
them" (Shumailov et al.'s recursive training on OPT-125m). Generation 0 is the base model. Generation g is
the base model fine-tuned (LoRA) on replies that generation g-1 sampled for the same training prompts of the
instruct mix; a control is fine-tuned on the human-written reference replies of those prompts instead.
Every model answers the same held-out prompts (greedy), and each generation is measured on them:

    distinct-1/2   unique words (word pairs) / all of them, over all replies: low = a narrow vocabulary
    words          mean reply length in words
    quirk share    replies containing one of the base model's most frequent 3-word phrases (found from
                   generation 0's training samples; phrases that occur in the reference replies are not quirks)
    repetition     share of each reply's 3-word phrases that repeat an earlier one in the same reply
    accuracy       exact answer (the instruct task's scorer)

    python lab/self_generated.py                     # SmolLM2-135M-Instruct -> results/self_generated.*
    python lab/self_generated.py --generations 4 --temperature 1.0
    python lab/self_generated.py --quick --out /tmp/lab   # a tiny random model, seconds (what CI runs)
"""

from collections import Counter
from dataclasses import dataclass

from common import LabConfig, finetune, parse, replies, run, save_results, setup, training_settings

from eval import split_reply
from model import Sampling
from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items, score, summarize


@dataclass
class Config(LabConfig):
    generations: int = cli.opt(3, "fine-tuned generations after the base model", group="experiment", min=1)
    prompts: int = cli.opt(64, "training prompts (instruct train split), one sampled reply each", min=1)
    temperature: float = cli.opt(0.7, "sampling temperature of the training replies", above=0)
    steps: int = cli.opt(16, "optimizer steps per generation (and for the control)", min=1)
    max_new_tokens: int = cli.opt(64, "longest reply, sampled or greedy", min=1)
    n_quirks: int = cli.opt(5, "how many of the base model's frequent phrases to follow", min=1)


def trigrams(text):
    words = text.lower().split()
    return [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]


def distinct(texts, n):
    grams = [tuple(t.lower().split()[i:i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def repetition(text):
    grams = trigrams(text)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def measure(gen, out, records, quirks):
    scores = [score("instruct", reply, r) for reply, r in zip(out, records)]
    acc = summarize("instruct", scores, [r.get("family", "") for r in records], set())["accuracy"]
    return {"generation": gen, "distinct_1": distinct(out, 1), "distinct_2": distinct(out, 2),
            "words": sum(len(t.split()) for t in out) / len(out),
            "quirk_share": sum(any(q in " ".join(t.lower().split()) for q in quirks) for t in out) / len(out),
            "repetition": sum(map(repetition, out)) / len(out), "accuracy": acc,
            "samples": out[:3]}


def main(argv=None):
    cfg = parse(Config, "Fine-tuning on the model's own replies, generation after generation, vs a human-data control.",
                argv)
    if cfg.quick:
        cfg.generations, cfg.prompts, cfg.steps, cfg.max_new_tokens = 2, 8, 2, 8
    lab = setup(cfg)
    train_records = load_items("instruct", "train", cfg.prompts)[0]
    held_out = load_items("instruct", "test", cfg.eval_items)[0]
    prompts = [split_reply(r["messages"])[0] for r in train_records]
    references = [split_reply(r["messages"])[1] for r in train_records]

    def sample(model, gen):  # generation gen's training data: the model's own reply to every training prompt
        sampling = Sampling(cfg.temperature, seed=cfg.seed + gen)
        out = replies(lab, model, train_records, cfg.max_new_tokens, sampling, f"sample g{gen}")
        return out, [p + [{"role": "assistant", "content": o}] for p, o in zip(prompts, out)]

    base_samples, data = sample(lab.base, 0)
    in_refs = {g for ref in references for g in trigrams(ref)}
    counts = Counter(g for t in base_samples for g in set(trigrams(t)) if g not in in_refs)
    quirks = [g for g, _ in counts.most_common(cfg.n_quirks)]
    print("the base model's frequent phrases:", quirks)

    rows = [measure(0, replies(lab, lab.base, held_out, cfg.max_new_tokens, desc="g0"), held_out, quirks)]
    for gen in range(1, cfg.generations + 1):
        model, _ = finetune(lab, data, cfg.steps, desc=f"train g{gen}", dedup=False)
        rows.append(measure(gen, replies(lab, model, held_out, cfg.max_new_tokens, desc=f"g{gen}"), held_out, quirks))
        if gen < cfg.generations:
            _, data = sample(model, gen)
        del model
    control, _ = finetune(lab, [r["messages"] for r in train_records], cfg.steps, desc="train control")
    rows.append({**measure("control", replies(lab, control, held_out, cfg.max_new_tokens, desc="control"), held_out,
                           quirks), "generation": "human replies (control)"})

    cols = ("distinct_1", "distinct_2", "words", "quirk_share", "repetition", "accuracy")
    table = markdown_table(["generation", "distinct-1", "distinct-2", "words", "quirk share", "repetition",
                            "accuracy"],
                           [[r["generation"]] + [f"{r[c]:.1f}" if c == "words" else f"{r[c]:.2f}" for c in cols]
                            for r in rows])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(15, 3.2))
    gens = rows[:-1]
    for ax, c in zip(axes, cols):
        ax.plot([r["generation"] for r in gens], [r[c] for r in gens], "o-", label="own replies")
        ax.axhline(rows[-1][c], color="C2", ls="--", label="control (human)")
        ax.set(title=c.replace("_", " "), xlabel="generation")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    settings = {"generations": cfg.generations, "training prompts": cfg.prompts, "temperature": cfg.temperature,
                "steps": cfg.steps, "batch": cfg.batch_size, "training": training_settings(lab, cfg.steps) + ", from the "
                "base model every generation", "held-out prompts": len(held_out), "max_new_tokens": cfg.max_new_tokens,
                "quirk phrases": quirks}
    save_results(lab, "self_generated", "fine-tuning on model-generated data amplifies the base model's quirks",
                 settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
