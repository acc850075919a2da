"""plumbing/stats.py: measurements of a dataset and of a fine-tune's files: distinct-n diversity,
length percentiles, the padding share of length-grouped batches, a directory's size; and the dataset
summary train.py and data.py --show print.
"""

import math
import os


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
                # each n-gram kept as a hash, not a tuple of strings: memory grows with the distinct
                # n-grams, not with every word of the corpus n times over
                grams = [hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)]
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


def dir_bytes(d):
    """Total size of the files in a directory (the adapter, or the full model): what a fine-tune costs to store."""
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)))
