"""lab/overfitting.py: too few, too repetitive examples, trained for many epochs: does the model learn the
behaviour, or memorise the surface of the examples?

The claim: "with too few or too repetitive examples, the model memorizes surface patterns rather than the
intended behavior and generalizes poorly". Two training sets of the same size: repetitive (one problem
sentence per category, two names, one way to name each product, no greeting, context or sign-off) and diverse
(three problem sentences per category and the generator's full variety). After every epoch: the training loss,
the validation loss on new messages built like the training set's, and exact-match accuracy on test messages
whose problem sentences neither set contains (tasks/triage.py's `templates` knob). Early stopping would
keep the epoch with the lowest validation loss; the picture marks it.

    python lab/overfitting.py                        # SmolLM2-135M-Instruct, LoRA -> results/overfitting.*
    python lab/overfitting.py --epochs 6 --n-train 64
    python lab/overfitting.py --quick --out /tmp/lab # a tiny random model, seconds (what CI runs)
"""

from dataclasses import dataclass

from common import (LabConfig, finetune, parse, run, save_results, scored, setup,
                    training_settings, val_loss)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks.triage import build_triage

SEEN, UNSEEN = (0, 1, 2), (3, 4, 5, 6, 7)  # indices into each category's PROBLEMS sentences
KNOBS = {"repetitive": dict(templates=SEEN[:1], n_names=2, n_mentions=1, frame=False),
         "diverse": dict(templates=SEEN)}


@dataclass
class Config(LabConfig):
    n_train: int = cli.opt(32, "training conversations in each set", group="experiment", min=1)
    epochs: int = cli.opt(10, "passes over the training set", min=1)
    full: bool = cli.opt(False, "full fine-tuning instead of LoRA")


def main(argv=None):
    cfg = parse(Config, "Repetitive vs diverse training data, per epoch: train/val loss and unseen-template accuracy.",
                argv)
    if cfg.quick:
        cfg.n_train, cfg.epochs = 8, 2
    lab = setup(cfg)
    test = build_triage(seed=3, n_train=0, n_val=0, n_test=cfg.eval_items, templates=UNSEEN)["test"]
    per_epoch = cfg.n_train // cfg.batch_size
    results = {}
    for seed, (name, knobs) in enumerate(KNOBS.items(), start=1):
        splits = build_triage(seed=seed, n_train=cfg.n_train, n_val=cfg.n_train, n_test=0, **knobs)
        train_convs, val_convs = [r["messages"] for r in splits["train"]], [r["messages"] for r in splits["val"]]
        curve = []

        def measure(step, model, losses, optimizer=None):
            epoch = step // per_epoch
            s, _ = scored(lab, model, test, desc=f"{name} epoch {epoch}")
            curve.append({"epoch": epoch, "train_loss": sum(losses[-per_epoch:]) / per_epoch if losses else None,
                          "val_loss": val_loss(lab, model, val_convs), "unseen_exact": s["exact_match"],
                          "unseen_valid": s["valid"]})
            print(f"{name} epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in curve[-1].items()
                                                         if isinstance(v, float)))

        measure(0, lab.base, [])
        finetune(lab, train_convs, per_epoch * cfg.epochs, on_step=measure, every=per_epoch, desc=name, full=cfg.full)
        best = min(curve[1:], key=lambda c: c["val_loss"])
        results[name] = {"curve": curve, "early_stop_epoch": best["epoch"], "knobs": {k: list(v) if isinstance(v, tuple)
                                                                                     else v for k, v in knobs.items()}}

    rows = []
    for name, r in results.items():
        for c in r["curve"]:
            mark = " (early stop)" if c["epoch"] == r["early_stop_epoch"] else ""
            rows.append([name, f"{c['epoch']}{mark}", "—" if c["train_loss"] is None else f"{c['train_loss']:.3f}",
                         f"{c['val_loss']:.3f}", f"{c['unseen_exact']:.0%}", f"{c['unseen_valid']:.0%}"])
    table = markdown_table(["data", "epoch", "train loss", "val loss (same templates)", "unseen templates: exact",
                            "unseen: valid JSON"], rows)
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, r), color in zip(results.items(), ("C3", "C0")):
        ep = [c["epoch"] for c in r["curve"]]
        ax_loss.plot(ep[1:], [c["train_loss"] for c in r["curve"][1:]], "o-", color=color, label=f"{name}: train")
        ax_loss.plot(ep, [c["val_loss"] for c in r["curve"]], "s--", color=color, label=f"{name}: val (same templates)")
        ax_acc.plot(ep, [100 * c["unseen_exact"] for c in r["curve"]], "o-", color=color, label=f"{name}: exact")
        ax_acc.plot(ep, [100 * c["unseen_valid"] for c in r["curve"]], "s:", color=color, label=f"{name}: valid JSON")
        for ax in (ax_loss, ax_acc):
            ax.axvline(r["early_stop_epoch"], color=color, lw=1, alpha=0.5)
    ax_loss.set(xlabel="epoch", ylabel="loss (nats per reply token)", yscale="log",
                title="Loss (vertical lines: early stopping's epoch)")
    ax_acc.set(xlabel="epoch", ylabel=f"% of {len(test)} test messages", title="Messages in never-seen templates")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    settings = {"n_train": cfg.n_train, "epochs": cfg.epochs, "batch": cfg.batch_size,
                "training": training_settings(lab, per_epoch * cfg.epochs, full=cfg.full), "seen templates": list(SEEN),
                "unseen templates": list(UNSEEN), "test items": len(test), "decoding": "greedy"}
    save_results(lab, "overfitting", "too few or too repetitive examples: the model memorises surface patterns "
                 "and generalises poorly", settings, results, table, fig)


if __name__ == "__main__":
    run(main)
