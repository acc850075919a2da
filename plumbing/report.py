"""plumbing/report.py: turning measured numbers into what a person reads: dataset stats, the loss curve,
the evaluation table.

Nothing here computes a measurement; data.py, train.py and eval.py do, and hand their dicts over.
"""

import io
import json
import math
import os
import time

from plumbing.files import atomic_write_bytes, atomic_write_text
from tasks.triage import TRIAGE_FIELDS


def diversity(conversations, max_n=3):
    """Corpus diversity of what users write: distinct-n = unique word n-grams / all word n-grams over the user
    turns (n-grams do not cross messages). Low values mean a few templates repeated. System prompts and
    replies are left out: a fixed instruction or a strict output format repeats by design. Like any
    distinct-n it falls as the corpus grows, so compare datasets of similar size."""
    out = {}
    for n in range(1, max_n + 1):
        seen, total = set(), 0
        for conv in conversations:
            for m in conv:
                if m["role"] != "user":
                    continue
                words = m["content"].split()
                grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
                seen.update(grams)
                total += len(grams)
        out[f"distinct_{n}"] = len(seen) / max(total, 1)
    return out


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list (0 for an empty list)."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))]


def padding_fraction(examples, batch_list):
    """Share of input positions that are padding when each batch is collated to its longest example."""
    total = pad = 0
    for batch in batch_list:
        if not batch:
            continue
        n = [len(examples[i][0]) - 1 for i in batch]
        total += len(n) * max(n)
        pad += sum(max(n) - k for k in n)
    return pad / max(total, 1)


def format_stats(stats):
    """Human-readable multi-line summary of a tokenize_dataset stats dict."""
    s = stats
    return "\n".join([
        f"examples   {s['n_examples']} kept of {s['n_conversations']}: {s['n_duplicates']} duplicates, "
        f"{s['n_dropped']} dropped ({s['n_too_long']} too long, {s['n_untrained']} with no trained token), "
        f"{s['n_truncated']} truncated (overflow={s['overflow']})",
        f"tokens     per example p50 {s['len_p50']}  p90 {s['len_p90']}  p99 {s['len_p99']}  max {s['len_max']}"
        f"  (block_size {s['block_size']})",
        f"trained    {s['trained_share']:.1%} of {s['n_target_tokens']} target tokens "
        f"({s['n_trained_tokens']} trained, train_on={s['train_on']})",
        f"diversity  distinct-1 {s['distinct_1']:.3f}  distinct-2 {s['distinct_2']:.3f}  "
        f"distinct-3 {s['distinct_3']:.3f}  duplicate rate {s['duplicate_rate']:.1%}",
    ])


def pyplot():
    """matplotlib.pyplot drawing to files only (no window, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, png_path, dpi=110):
    """Write a matplotlib figure as a PNG atomically, and close it."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(png_path, png.getvalue())


def hardware(device):
    """What ran it, in words: the GPU's name, or the CPU's model and core count (for results files)."""
    import platform

    import torch
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), PyTorch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU used, PyTorch {torch.__version__}"


def save_plot(metrics_path, png_path):
    """Train vs validation loss curve (the overfitting view)."""
    plt = pyplot()
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (per step)", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, png_path, dpi=100)


def keep_metrics(path, step):
    """Rewrite metrics.jsonl with only the records up to step (0: an empty log for a new run)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pct(x):
    return f"{100 * x:5.1f}%"


RUNG_LABELS = {"base_zero_shot": "base, zero-shot", "base_few_shot": "base, {k}-shot",
               "base_retrieval": "base + retrieval", "fine_tuned": "fine-tuned",
               "fine_tuned_retrieval": "fine-tuned + retrieval"}


def human_bytes(n):
    """2500 -> "2.5 kB"; None -> "-"."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


def ladder_lines(ladder, title, cols, get):
    """The rungs as rows: the task's metrics, then what each costs (prompt tokens per request, bytes stored,
    seconds an update of the knowledge takes: re-index for retrieval, re-train for fine-tuning)."""
    width = max(max(len(c) for c in cols) + 2, 8)
    lines = [f"{title:34}" + "".join(f"{c:>{width}}" for c in cols) + f"{'prompt tok':>12}{'stored':>11}{'update':>11}"]
    for rung, m in ladder.items():
        label = RUNG_LABELS[rung].format(k=m.get("shots"))
        if m.get("skipped"):
            lines.append(f"  {label:32}skipped: {m['skipped']}")
            continue
        update = "-" if m.get("update_seconds") is None else f"{m['update_seconds']:,.3g} s"
        lines.append(f"  {label:32}" + "".join(f"{pct(v):>{width}}" for v in get(m)) +
                     f"{m['prompt_tokens']:>12,.0f}{human_bytes(m.get('stored_bytes')):>11}{update:>11}")
    return lines


def format_table(report):
    """The report's headline numbers as a short plain-text table."""
    task, lines = report["task"], []
    lines.append(f"eval: {report['tuned']} ({report['kind']}) vs base {report['model']} | data {report['data']}"
                 f"{' ' + report['split'] if report['split'] else ''}, {report['n_items']} items | "
                 f"{report['device']} {report['dtype']}")
    lines.append("")
    if task == "triage":
        cols = ["exact", "valid", *TRIAGE_FIELDS]
        get = lambda m: [m["exact_match"], m["valid"], *(m["fields"][f] for f in TRIAGE_FIELDS)]
    elif task == "instruct":
        cols = ["accuracy", "seen", "held-out"]
        get = lambda m: [m["accuracy"], m["seen"], m["held_out"]]
    elif task == "knowledge":
        cols = ["accuracy", "stale"]
        get = lambda m: [m["accuracy"], m["stale"]]
    else:
        cols = ["accuracy"]
        get = lambda m: [m["accuracy"]]
    lines += ladder_lines(report["ladder"], "ladder (same items, same scorer)", cols, get)
    if report.get("ladder_v2"):  # the knowledge task after its store changed: tuned on v1, retrieving v2
        lines += ["", *ladder_lines(report["ladder_v2"], "after the store changed (version 2)", cols, get)]
    if task == "instruct":  # which families the tuned model gets right; * marks families never trained on
        fams = report["ladder"]["fine_tuned"]["families"]
        per = [f"{name}{'*' if v['held_out'] else ''} {round(v['accuracy'] * v['n'])}/{v['n']}"
               for name, v in fams.items()]
        row = "  fine-tuned per family (* held out):"
        for i, item in enumerate(per):
            if len(row) + len(item) + 2 > 110:  # wrap between items, never inside one
                lines.append(row + ("," if i else ""))
                row = "    " + item
            else:
                row += (", " if i else " ") + item
        lines.append(row)
    lines.append("")
    lines.append(f"{'response loss':34}base {report['base_loss']:.3f} (ppl {report['base_perplexity']:.1f})   "
                 f"tuned {report['loss']:.3f} (ppl {report['perplexity']:.1f})   "
                 f"[{report['n_response_tokens']} tokens]")
    o = report["overfitting"]
    if o.get("skipped"):
        lines.append(f"{'overfitting':34}skipped: {o['skipped']}")
    else:
        lines.append(f"{'overfitting (tuned)':34}train loss {o['train_loss']:.3f}   test loss {o['test_loss']:.3f}"
                     f"   gap {o['gap']:+.3f}")
    f = report["forgetting"]
    lines.append(f"{'forgetting (general text)':34}ppl base {f['base_perplexity']:.1f} -> tuned "
                 f"{f['tuned_perplexity']:.1f} ({100 * f['perplexity_change']:+.1f}%)   KL(base||tuned) "
                 f"{f['kl_base_tuned']:.3g} nats/token   [{f['n_tokens']} tokens]")
    if report["samples"]:
        lines.append("")
        lines.append("side by side (greedy)")
        for i, s in enumerate(report["samples"], 1):
            lines.append(f"[{i}] user:      {one_line(s['user'], 100)}")
            lines.append(f"    reference: {one_line(s['reference'], 100)}")
            lines.append(f"    base:      {one_line(s['base'], 100) or '(empty reply)'}")
            lines.append(f"    tuned:     {one_line(s['tuned'], 100) or '(empty reply)'}")
    return "\n".join(lines)


def one_line(text, width):
    """Text on one line (newlines shown as the two characters \\n), cut to width characters."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


def dir_bytes(d):
    """Total size of the files in a directory (the adapter, or the full model): what a fine-tune costs to store."""
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)))


def write_run_json(out_dir, master, info, status, step, t_start):
    """run.json: the run's settings and outcome (rank 0 only), rewritten atomically at every status change."""
    if master:
        os.makedirs(out_dir, exist_ok=True)
        info = dict(info, status=status, steps=step, wall_time_s=round(time.time() - t_start, 2))
        atomic_write_text(os.path.join(out_dir, "run.json"), json.dumps(info, indent=2) + "\n")


def markdown_table(header, rows):
    """A GitHub markdown table: a header row, then one row per list (cells str()-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
