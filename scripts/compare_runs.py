"""scripts/compare_runs.py: two runs scored on the same test items, compared item by item.

Every lab cache file (results/cache/NAME/*.json) keeps each scored item's result under "items". Given two
such files, or two lists of seeds (paired in order), this prints each side's rate with its 95% interval
over items and seeds and the difference with a paired bootstrap interval (plumbing/intervals.py):
whether two settings differ beyond the noise, asked of runs already made, with nothing retrained.

    python scripts/compare_runs.py -a A.json -b B.json                          # every metric both keep
    python scripts/compare_runs.py -a A1.json,A2.json -b B1.json,B2.json --metric exact_match  # seeds in order
"""

import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import cli  # noqa: E402
from plumbing.intervals import item_rate, paired_bootstrap  # noqa: E402


@dataclass
class CompareConfig:
    a: str = cli.opt("", "run A: a cache file with per-item scores, or comma-separated files (one per seed)",
                     flag="-a", metavar="A.json[,...]")
    b: str = cli.opt("", "run B, the same items and as many seeds as A", flag="-b", metavar="B.json[,...]")
    metric: str = cli.opt("", "comma-separated metrics to compare (default: every per-item metric both keep)")


def load_items(spec):
    """[{metric: [score per item]} per seed] from comma-separated cache files, each checked for "items"."""
    seeds = []
    for path in spec.split(","):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        if not isinstance(run, dict) or not isinstance(run.get("items"), dict):
            raise ValueError(f"{path}: no per-item scores (\"items\"); compare lab cache files kept since the "
                             "lab stored them")
        seeds.append(run["items"])
    return seeds


def compare(a, b, metrics):
    """Lines of text: per metric, A's and B's rate over all seeds and items, and A - B paired."""
    lines = []
    for m in metrics:
        sa, sb = [s[m] for s in a], [s[m] for s in b]
        if [len(x) for x in sa] != [len(y) for y in sb]:
            raise ValueError(f"{m}: A and B scored different numbers of items; pair runs on the same test set")
        sample = f"{len(sa[0])} items x {len(sa)} seeds" if len(sa) > 1 else f"{len(sa[0])} items"
        ra, rb = item_rate(sa), item_rate(sb)
        d, low, high = paired_bootstrap(sa, sb)
        seen = "no difference seen" if low <= 0 <= high else "a difference"
        lines.append(f"{m}: A {ra[0]:.1%} [{ra[1]:.1%}, {ra[2]:.1%}]  B {rb[0]:.1%} [{rb[1]:.1%}, {rb[2]:.1%}]  "
                     f"A - B {d:+.3f} [{low:+.3f}, {high:+.3f}]  ({seen}; {sample})")
    return lines


def main(argv=None):
    cfg, _ = cli.parse(CompareConfig, argv, "Compare two runs item by item: rates and a paired interval.")
    try:
        if not cfg.a or not cfg.b:
            raise ValueError("give both runs: -a A.json -b B.json (comma-separated files for several seeds)")
        a, b = load_items(cfg.a), load_items(cfg.b)
        if len(a) != len(b):
            raise ValueError(f"A has {len(a)} seeds and B {len(b)}: pair them one to one, in order")
        shared = [m for m in a[0] if all(m in s for s in a + b)]
        metrics = cfg.metric.split(",") if cfg.metric else shared
        missing = [m for m in metrics if m not in shared]
        if missing:
            raise ValueError(f"--metric {','.join(missing)}: not kept per item by both runs "
                             f"(kept: {', '.join(shared)})")
        print("\n".join(compare(a, b, metrics)))
    except cli.USER_ERRORS as e:
        sys.exit(cli.error_line(e))


if __name__ == "__main__":
    main()
