"""lab/masking.py: what the loss mask teaches. The classic masking bugs of the field, shown as numbers.

The claim: "the loss is usually applied only to the response tokens, so the model learns to answer prompts
rather than continue them". Three triage runs of equal steps that differ only in the mask (lab/common.py's
mask_fn changes data.py's mask after rendering; the tokens are the same):

    reply only       data.py's mask: each reply and the end-of-turn token that closes it
    every token      the loss on system, user, headers and reply alike (what plain language-model training does)
    reply, no stop   the reply without its end-of-turn token: the model is never taught to stop

Each model answers the same held-out messages (greedy, at most --max-new-tokens): exact match, valid JSON,
the share of replies that end by themselves (an end-of-turn token before the cap), and the share that go on
to write the next turn (a role header, or ChatML's <|im_start|>).

    python lab/masking.py                            # SmolLM2-135M-Instruct, LoRA -> results/masking.*
    python lab/masking.py --steps 60
    python lab/masking.py --quick --out /tmp/lab     # a tiny random model, seconds (what CI runs)
"""

from dataclasses import dataclass

from common import (LabConfig, StopRecorder, cached_runs, finetune, grouped_bars, merge_seeds, parse, prompts_of,
                    rate_text, run, save_results, scored, seed_list, setup, training_settings)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks import load_items

NEXT_TURN = ("<|im_start|>", "User:", "user\n", "Assistant:", "assistant\n")  # how a new turn starts in text


@dataclass
class Config(LabConfig):
    steps: int = cli.opt(32, "optimizer steps of every run", group="experiment", min=1)
    max_new_tokens: int = cli.opt(64, "generation cap: a reply that reaches it did not stop by itself", min=1)
    full: bool = cli.opt(False, "full fine-tuning instead of LoRA")


def main(argv=None):
    cfg = parse(Config, "Response-only loss vs loss on every token vs a reply without its end-of-turn token.",
                argv)
    if cfg.quick:
        cfg.steps, cfg.max_new_tokens = 2, 8
    lab = setup(cfg)
    end = lab.fmt.end_of_turn_id
    masks = {"reply only": None,
             "every token": lambda ids, mask: [1] * len(ids),
             "reply, no stop": lambda ids, mask: [m if t != end else 0 for t, m in zip(ids, mask)]}
    train_convs = [r["messages"] for r in load_items("triage", "train", 0)[0]]
    test = load_items("triage", "test", cfg.eval_items)[0]
    rows = []
    for name, mask_fn in masks.items():
        def run_one(seed):
            model, losses = finetune(lab, train_convs, cfg.steps, desc=f"{name} s{seed}", mask_fn=mask_fn,
                                     full=cfg.full, seed=seed)
            recorder = StopRecorder(lab.fmt.stop_ids)
            s, replies = scored(lab, model, test, max_new_tokens=cfg.max_new_tokens, desc=name,
                                replies_of=recorder)
            stops = [int(recorder.stopped[tuple(p)]) for p in prompts_of(lab, test, cfg.max_new_tokens)]
            nexts = [int(any(m in r for m in NEXT_TURN)) for r in replies]
            return {"exact_match": s["exact_match"], "valid": s["valid"], "stops": sum(stops) / len(stops),
                    "writes_next_turn": sum(nexts) / len(nexts), "final_loss": sum(losses[-4:]) / 4,
                    "items": {**s["items"], "stops": stops, "writes_next_turn": nexts}, "replies": replies}

        runs = cached_runs(lab, "masking", f"{name}-{cfg.steps}steps-{len(test)}items-full{int(cfg.full)}",
                           run_one)
        row = merge_seeds(runs, ("exact_match", "valid", "stops", "writes_next_turn", "final_loss"))
        rows.append({"mask": name, **row, "sample": runs[0]["replies"][0]})
        print(f"{name}: exact {row['exact_match']:.0%}, stops {row['stops']:.0%} over {len(runs)} seed(s)")

    cols = ("exact_match", "valid", "stops", "writes_next_turn")
    table = markdown_table(["mask", "exact match [95%]", "valid JSON", "stops by itself", "writes the next turn",
                            "train loss (last 4)", "first reply"],
                           [[r["mask"]] + [rate_text(r, c) for c in cols] + [f"{r['final_loss']:.3f}",
                            "`" + r["sample"][:60].replace("\n", "\\n").replace("|", "\\|") + "`"] for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    grouped_bars(ax, rows, cols, ["exact match", "valid JSON", "stops by itself", "writes the next turn"], "mask")
    ax.set_ylabel(f"% of {len(test)} test messages")
    ax.set_title(f"What the loss mask teaches ({cfg.steps} steps each)")
    ax.legend()
    settings = {"steps": cfg.steps, "batch": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
                "training": training_settings(lab, cfg.steps, full=cfg.full), "test items": len(test),
                "seeds": seed_list(cfg), "decoding": "greedy"}
    save_results(lab, "masking", "loss on the response tokens only teaches the model to answer, not to continue "
                 "the prompt; without the end-of-turn token it never learns to stop", settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
