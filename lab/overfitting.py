"""lab/overfitting.py: too few, too repetitive examples, trained for many epochs: does the model learn the
behaviour, or memorise the surface of the examples?

The claim: "with too few or too repetitive examples, the model memorizes surface patterns rather than the
intended behavior and generalizes poorly". Two training sets of the same small size: repetitive (one problem
sentence per category, two names, one way to name each product, no greeting, context or sign-off) and diverse
(three problem sentences per category and the generator's full variety). Full fine-tuning at a constant
learning rate (the first version, LoRA with a decaying rate over 10 epochs, never turned either validation
loss: it could not show the claim). After every epoch, two validation losses: on new messages built like the
training set ("seen templates", what a practitioner's held-out split would be) and on messages whose problem
sentences neither set contains ("unseen templates", tasks/triage.py's `templates` knob). Early stopping keeps
the epoch with the lowest seen-template validation loss; that model and the last epoch's are both scored on
the unseen-template test messages (exact match of all four labels, valid JSON), per item and seed.

    python lab/overfitting.py --seeds 1337,1338,1339 --dtype bfloat16   # SmolLM2 -> results/overfitting.*
    python lab/overfitting.py --epochs 10 --n-train 32 --lr 2e-5
    python lab/overfitting.py --quick --out /tmp/lab # a tiny random model, seconds (what CI runs)
"""

from dataclasses import dataclass

from common import (LabConfig, cached_runs, finetune, merge_seeds, parse, rate_bars, rate_text, run,
                    save_results, scored, seed_list, setup, training_settings, val_loss)

from plumbing import cli
from plumbing.plots import pyplot
from plumbing.report import markdown_table
from tasks.triage import build_triage

SEEN, UNSEEN = (0, 1, 2), (3, 4, 5, 6, 7)  # indices into each category's PROBLEMS sentences
KNOBS = {"repetitive": dict(templates=SEEN[:1], n_names=2, n_mentions=1, frame=False),
         "diverse": dict(templates=SEEN)}
KNOBS_SEED = {"repetitive": 1, "diverse": 2}  # each set is drawn once; --seeds vary the training order


@dataclass
class Config(LabConfig):
    n_train: int = cli.opt(16, "training conversations in each set", group="experiment", min=1)
    epochs: int = cli.opt(20, "passes over the training set", min=1)
    lr: float = cli.opt(5e-5, "learning rate, constant after warmup (train.py's full fine-tuning default)", above=0)
    lora: bool = cli.opt(False, "LoRA (rank 16) instead of full fine-tuning (the first version's method)")


def train_and_score(lab, cfg, seed, name, test, val_unseen):
    """One (data, seed) run: the per-epoch curve, and the early-stopped and last models' unseen-test scores."""
    splits = build_triage(seed=KNOBS_SEED[name], n_train=cfg.n_train, n_val=cfg.n_train, n_test=0, **KNOBS[name])
    train_convs, val_seen = [r["messages"] for r in splits["train"]], [r["messages"] for r in splits["val"]]
    per_epoch, curve, best = max(1, cfg.n_train // cfg.batch_size), [], {}

    def at_epoch(step, model, losses, optimizer=None):
        epoch = step // per_epoch
        c = {"epoch": epoch, "train_loss": sum(losses[-per_epoch:]) / per_epoch if losses else None,
             "val_seen": val_loss(lab, model, val_seen), "val_unseen": val_loss(lab, model, val_unseen)}
        curve.append(c)
        if epoch and c["val_seen"] < best.get("val_seen", float("inf")):  # early stopping's copy of the weights
            best.update(c, state={k: v.detach().clone() for k, v in model.state_dict().items()})

    at_epoch(0, lab.base, [])
    model, _ = finetune(lab, train_convs, per_epoch * cfg.epochs, on_step=at_epoch, every=per_epoch,
                        desc=f"{name} s{seed}", full=not cfg.lora, lr=cfg.lr, min_lr_ratio=1.0, seed=seed)
    last, last_replies = scored(lab, model, test, desc=f"{name} last epoch")
    (early, early_replies), state = (last, last_replies), best.pop("state")
    if best["epoch"] != cfg.epochs:  # early stopping kept an earlier epoch's weights (else: the same, scored)
        model.load_state_dict(state)
        early, early_replies = scored(lab, model, test, desc=f"{name} early stop (epoch {best['epoch']})")
    out = {"curve": curve, "early_stop_epoch": best["epoch"], "items": {},
           "replies": {"last": last_replies, "early": early_replies}}
    for tag, s in (("last", last), ("early", early)):
        out.update({f"{tag}_exact": s["exact_match"], f"{tag}_valid": s["valid"]})
        out["items"].update({f"{tag}_exact": s["items"]["exact_match"], f"{tag}_valid": s["items"]["valid"]})
    return out

METRICS = ("last_exact", "last_valid", "early_exact", "early_valid")
CURVE = ("train_loss", "val_seen", "val_unseen")


def main(argv=None):
    cfg = parse(Config, "Repetitive vs diverse training data, per epoch: validation loss on seen and unseen "
                "templates; unseen-template accuracy at early stopping and at the end.", argv)
    if cfg.quick:
        cfg.n_train, cfg.epochs = 8, 2
    lab = setup(cfg)
    test = build_triage(seed=3, n_train=0, n_val=0, n_test=cfg.eval_items, templates=UNSEEN)["test"]
    in_test = {r["messages"][1]["content"] for r in test}  # unseen-template validation: never a test message
    drawn = build_triage(seed=4, n_train=0, n_val=2 * cfg.n_train, n_test=0, templates=UNSEEN)["val"]
    val_unseen = [r["messages"] for r in drawn if r["messages"][1]["content"] not in in_test][:cfg.n_train]
    rows = []
    for name in KNOBS:
        method = "lora" if cfg.lora else "full"
        key = f"{name}-n{cfg.n_train}-{cfg.epochs}epochs-lr{cfg.lr:g}-{method}-{len(test)}items"
        runs = cached_runs(lab, "overfitting", key, lambda seed: train_and_score(lab, cfg, seed, name, test,
                                                                                    val_unseen))
        row = merge_seeds(runs, METRICS)
        row["early_stop_epochs"] = [r["early_stop_epoch"] for r in runs]
        row["curve"] = [{"epoch": c["epoch"], **{k: None if c[k] is None else
                                                 sum(r["curve"][i][k] for r in runs) / len(runs) for k in CURVE}}
                        for i, c in enumerate(runs[0]["curve"])]
        rows.append({"data": name, **row})
        print(f"{name}: unseen exact {row['early_exact']:.0%} at early stop, {row['last_exact']:.0%} at the end")

    table = markdown_table(
        ["data", "early stop: epoch per seed", "unseen exact, early stop [95%]", "unseen exact, last epoch [95%]",
         "valid JSON, last", "val loss seen: best / last", "val loss unseen: epoch 0 / best / last"],
        [[r["data"], ", ".join(map(str, r["early_stop_epochs"])), rate_text(r, "early_exact"),
          rate_text(r, "last_exact"), rate_text(r, "last_valid"),
          f"{min(c['val_seen'] for c in r['curve'][1:]):.3f} / {r['curve'][-1]['val_seen']:.3f}",
          f"{r['curve'][0]['val_unseen']:.3f} / {min(c['val_unseen'] for c in r['curve'][1:]):.3f} / "
          f"{r['curve'][-1]['val_unseen']:.3f}"] for r in rows])
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r, color in zip(rows, ("C3", "C0")):
        ep = [c["epoch"] for c in r["curve"]]
        ax_loss.plot(ep[1:], [c["train_loss"] for c in r["curve"][1:]], "o-", color=color, label=f"{r['data']}: train")
        ax_loss.plot(ep, [c["val_seen"] for c in r["curve"]], "s--", color=color, label=f"{r['data']}: val, seen")
        ax_loss.plot(ep, [c["val_unseen"] for c in r["curve"]], "^:", color=color, label=f"{r['data']}: val, unseen")
        for e in r["early_stop_epochs"]:
            ax_loss.axvline(e, color=color, lw=1, alpha=0.4)
    x = range(len(rows))
    for offset, metric, label in ((-0.2, "early_exact", "early stop"), (0.2, "last_exact", "last epoch")):
        rates, yerr = rate_bars(rows, metric)  # error bars: 95% over items and seeds (rate_interval)
        ax_acc.bar([i + offset for i in x], rates, 0.4, yerr=yerr, label=label, capsize=3)
    ax_acc.set_xticks(list(x))
    ax_acc.set_xticklabels([r["data"] for r in rows])
    ax_loss.set(xlabel="epoch (thin lines: early stopping's epoch per seed)", ylabel="loss (nats per reply token)",
                yscale="log", title="Loss, mean over seeds")
    ax_acc.set(ylabel=f"exact match, % of {len(test)} unseen-template messages", title="Never-seen templates")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    steps = max(1, cfg.n_train // cfg.batch_size) * cfg.epochs
    settings = {"n_train": cfg.n_train, "epochs": cfg.epochs, "batch": cfg.batch_size,
                "training": training_settings(lab, steps, full=not cfg.lora, lr=cfg.lr, min_lr_ratio=1.0),
                "seen templates": list(SEEN), "unseen templates": list(UNSEEN), "test items": len(test),
                "validation": f"{cfg.n_train} seen-template and {cfg.n_train} unseen-template conversations",
                "seeds": seed_list(cfg), "decoding": "greedy"}
    save_results(lab, "overfitting", "too few or too repetitive examples: the model memorises surface patterns "
                 "and generalises poorly", settings, rows, table, fig)


if __name__ == "__main__":
    run(main)
