"""plumbing/report.py: turning eval.py's report into what a person reads: the ladder table with its
costs, the loss and forgetting lines, the side-by-side replies; markdown tables and the hardware line
for results files. Each task supplies its own columns (tasks.report_columns).

Nothing here computes a measurement; eval.py and the lab do, and hand their dicts over.
"""

import os
import unicodedata


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


def format_table(report, columns):
    """The report's headline numbers as a short plain-text table. columns: (names, get), the task's
    metric columns and get(metrics) -> their values (tasks.report_columns)."""
    cols, get = columns
    lines = [f"eval: {report['tuned']} ({report['kind']}) vs base {report['model']} | data "
             f"{report['data']}{' ' + report['split'] if report['split'] else ''}, {report['n_items']} items"
             f" | {report['device']} {report['dtype']}", ""]
    lines += ladder_lines(report["ladder"], "ladder (same items, same scorer)", cols, get)
    if report.get("ladder_v2"):  # the knowledge task after its store changed: tuned on v1, retrieving v2
        lines += ["", *ladder_lines(report["ladder_v2"], "after the store changed (version 2)", cols, get)]
    fams = report["ladder"]["fine_tuned"].get("families")
    if fams:  # instruct: which families the tuned model gets right; * marks those never trained on
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


# Unicode's bidirectional formatting characters: shown raw, they reorder the text a terminal displays.
BIDI_CONTROLS = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text, keep="\n\t"):
    """Text safe to print to a terminal: control characters (an escape sequence that recolours or clears
    the screen, a bidirectional override that reorders what is shown) as their escapes, e.g. \\x1b; the
    characters in keep stay as they are."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if ch not in keep and
                   (unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS) else ch for ch in text)


def one_line(text, width):
    """Text on one line (newlines shown as the two characters \\n, other control characters escaped),
    cut to width characters."""
    text = printable(text.replace("\n", "\\n"), keep="")
    return text if len(text) <= width else text[:width - 3] + "..."


def markdown_table(header, rows):
    """A GitHub markdown table: a header row, then one row per list (cells str()-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
