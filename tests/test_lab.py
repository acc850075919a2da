"""Tests for lab/: every experiment script runs end to end with --quick and writes finite numbers for every
configuration it lists; the lab's in-process fine-tuning is train.py's, step for step; the triage knobs
the experiments turn do what they say and leave the default dataset byte for byte unchanged.

    python -m pytest -q tests/test_lab.py
"""

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_args, cells_of, run_main

from model import from_pretrained
from plumbing.intervals import mean_interval

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lab"))


def run_lab(script, out, *args):
    """A lab script as a user runs it; --quick uses a tiny random model of SmolLM2's family and tokenizer."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "lab" / script), "--quick", "--out", str(out), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def numbers(x):
    """Every number in a nested JSON value."""
    if isinstance(x, dict):
        return [n for v in x.values() for n in numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in numbers(v)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def check_outputs(out, name):
    """NAME.json/.md/.png exist; the json's results hold only finite numbers; returns the results."""
    report = json.loads((out / f"{name}.json").read_text())
    assert report["quick"] is True and report["hardware"] and report["command"].startswith("python lab/")
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / f"{name}.md").read_text()
    assert report["claim"] in md and report["command"] in md and f"![{name}]({name}.png)" in md
    nums = numbers(report["results"])
    assert nums and all(math.isfinite(n) for n in nums)
    cached = sorted((out / "cache" / name).glob("*.json"))
    assert cached
    for path in cached:  # every run keeps the replies it was scored on: re-scorable without retraining
        assert list(texts_under(json.loads(path.read_text()), "replies")), path
    return report["results"]


def texts_under(tree, key):
    """Every string in a JSON tree below a key named key (a list of replies, or a dict of such lists)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from (strings(v) if k == key else texts_under(v, key))
    elif isinstance(tree, list):
        for v in tree:
            yield from texts_under(v, key)


def strings(tree):
    if isinstance(tree, str):
        yield tree
    for v in tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else ():
        yield from strings(v)


# -----------------------------------------------------------------------------
# Each script end to end (--quick: a tiny random model, two steps: what CI can afford)


@pytest.fixture(scope="module")
def quick_gguf(smollm2_gguf):
    return smollm2_gguf  # the scripts' default --model; --quick reads only its config and tokenizer


def test_data_size_quick(quick_gguf, tmp_path):
    r = run_lab("data_size.py", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = check_outputs(tmp_path, "data_size")
    assert [(x["method"], x["n_train"]) for x in rows] == [("base (no tuning)", 0), ("lora", 4), ("lora", 16),
                                                          ("full", 4), ("full", 16)]
    assert all(0 <= x["exact_match"] <= x["valid"] <= 1 for x in rows)  # exact implies valid
    assert all(len(x["items"]["exact_match"][0]) == 4 and len(x["items"]["product"][0]) == 4 for x in rows)
    import data_size  # equal epochs, not equal steps: 4x the conversations, 4x the steps

    cfg = data_size.Config(epochs=2.0, batch_size=8)
    assert [data_size.steps_for(cfg, n) for n in (25, 100, 400, 1600)] == [7, 25, 100, 400]
    assert data_size.steps_for(data_size.Config(epochs=0.1), 4) == 2  # never fewer than 2 (warmup + decay)


def test_overfitting_quick(quick_gguf, tmp_path):
    r = run_lab("overfitting.py", tmp_path, "--seeds", "1,2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = check_outputs(tmp_path, "overfitting")
    assert [x["data"] for x in rows] == ["repetitive", "diverse"]
    for row in rows:
        assert [c["epoch"] for c in row["curve"]] == [0, 1, 2]
        assert row["curve"][0]["train_loss"] is None  # epoch 0: the base model, before any step
        assert len(row["early_stop_epochs"]) == 2 and all(1 <= e <= 2 for e in row["early_stop_epochs"])
        assert all(len(row["items"][k]) == 2 and len(row["items"][k][0]) == 4 for k in ("early_exact", "last_exact"))
    for path in (tmp_path / "cache" / "overfitting").glob("*.json"):  # early stopping keeps the lowest seen val
        run = json.loads(path.read_text())
        best = min(run["curve"][1:], key=lambda c: c["val_seen"])["epoch"]
        assert run["early_stop_epoch"] == best


def test_quality_quick(quick_gguf, quick_dir):
    r = run_lab("quality.py", quick_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["data"]: x for x in check_outputs(quick_dir, "quality")}
    assert list(rows) == ["clean small", "noisy large", "repetitive", "clean large"]
    assert (rows["clean small"]["conversations"], rows["clean large"]["conversations"]) == (8, 32)
    # the small set's size, from 8 / 4 narrow messages, 4 copies each
    assert rows["repetitive"]["distinct"] == 2 and rows["repetitive"]["conversations"] == 8
    assert rows["noisy large"]["distinct"] == 32


def test_self_generated_quick(quick_gguf, tmp_path):
    r = run_lab("self_generated.py", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = check_outputs(tmp_path, "self_generated")
    assert [(x["measured"], x["generation"]) for x in rows] == [  # samples of every generation but the last
        ("held out", 0), ("samples", 0), ("samples", 1), ("held out", 2), ("held out", "human replies (control)")]
    assert all(0 <= x[k] <= 1 for x in rows for k in ("distinct_1", "distinct_2", "quirk_share", "accuracy",
                                                      "stops", "char_repeats"))
    n_items = {"held out": 4, "samples": 8}  # --quick: 4 held-out prompts, 8 training prompts
    assert all(len(x["items"]["quirk_share"]) == 1 and len(x["items"]["quirk_share"][0]) == n_items[x["measured"]]
               for x in rows)


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    """One --out for the quick runs that lab/claims.py then reads (test_claims_on_quick_outputs)."""
    return tmp_path_factory.mktemp("quick_results")


def test_masking_quick(quick_gguf, quick_dir):
    r = run_lab("masking.py", quick_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = check_outputs(quick_dir, "masking")
    assert [x["mask"] for x in rows] == ["reply only", "every token", "reply, no stop"]
    assert all(0 <= x[k] <= 1 for x in rows for k in ("stops", "writes_next_turn", "exact_match", "valid"))


def test_lora_rank_quick(quick_gguf, tmp_path):
    r = run_lab("lora_rank.py", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = check_outputs(tmp_path, "lora_rank")
    assert [x["method"] for x in rows] == ["LoRA r=1", "LoRA r=4", "full"]
    lora1, lora4, full = rows
    assert lora4["trainable"] == 4 * lora1["trainable"] < full["trainable"]  # A and B grow linearly with r
    for x in rows:  # AdamW: two fp32 moments per trained weight (+ a step counter per tensor)
        assert 8 * x["trainable"] <= x["optimizer_bytes"] < 8 * x["trainable"] + 1024 * 8
    assert lora1["stored_bytes"] < lora4["stored_bytes"] < full["stored_bytes"]
    report = json.loads((tmp_path / "lora_rank.json").read_text())
    assert report["settings"]["alpha"] == 16.0  # one alpha for every rank: only the rank changes
    assert all(len(x["items"]["exact_match"][0]) == 4 for x in rows)


def test_headline_quick(quick_gguf, quick_dir):
    """The README's first table: base, LoRA and full, each with its per-item triage scores, forgetting and
    what it stores (an adapter is less than a whole model)."""
    r = run_lab("headline.py", quick_dir, "--seeds", "1,2")
    assert r.returncode == 0, r.stderr[-2000:]
    base, lora_row, full = check_outputs(quick_dir, "headline")
    assert [x["run"] for x in (base, lora_row, full)] == [
        "base (no tuning)", "LoRA (r=16, lr 5e-4)", "full fine-tune (lr 5e-5)"]
    assert base["kl"] == 0 and base["stored_bytes"] == 0 and base["train_s"] == 0
    assert 0 < lora_row["stored_bytes"] < full["stored_bytes"] and lora_row["kl"] > 0 and full["kl"] > 0
    assert all(len(x["items"]["exact_match"]) == 2 and len(x["items"]["category"][0]) == 4 for x in (base, full))
    assert len(list((quick_dir / "cache" / "headline").glob("*base*-s[12].json"))) == 2  # measured once, stored twice
    settings = json.loads((quick_dir / "headline.json").read_text())["settings"]  # the labels are train.py's defaults
    lora_settings, full_settings = settings["runs"].split("; full fine-tune;")
    assert lora_settings.startswith("LoRA r=16,") and "AdamW lr 0.0005 " in lora_settings
    assert "AdamW lr 5e-05 " in full_settings
    # the tuned rows' perplexity change and KL: mean [95% t interval across the 2 seeds]
    m, low, high = mean_interval(lora_row["per_seed"]["kl"])
    c, c_low, c_high = mean_interval(lora_row["per_seed"]["perplexity_change"])
    row = next(line for line in (quick_dir / "headline.md").read_text().splitlines() if line.startswith("| LoRA"))
    assert f"({c:+.1%} [{c_low:+.1%}, {c_high:+.1%}]) | {m:.3f} [{low:.3f}, {high:.3f}] |" in row, row


def test_forgetting_quick(quick_gguf, tmp_path):
    r = run_lab("forgetting.py", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = check_outputs(tmp_path, "forgetting")
    assert [(x["run"], x["step"]) for x in rows] == [
        ("base", 0), ("lora lr 0.0005", 2), ("full lr 5e-05", 2), ("lora lr 0.0005 + 25% instruct", 2),
        ("full lr 5e-05 + 25% instruct", 2)]
    assert rows[0]["kl"] == 0 and rows[0]["perplexity_change"] == 0  # the base model against itself
    # per item, per seed: the instruct items' reference-reply NLL and the general-text windows
    assert all(len(x["items"]["instruct_nll"][0]) == 4 and x["items"]["general_nll"][0] for x in rows)
    assert all(v > 0 for x in rows for v in x["items"]["instruct_nll"][0])


def test_instruct_vs_task_quick(quick_gguf, tmp_path):
    r = run_lab("instruct_vs_task.py", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = check_outputs(tmp_path, "instruct_vs_task")
    assert [x["model"] for x in rows] == ["base (no tuning)", "instruction-tuned", "task-tuned (triage)",
                                         "both, mixed"]
    # --quick's 4 items of each group, per item and seed; held-out skills never trained
    assert all(len(x["items"][k][0]) == 4 for x in rows for k in ("instruct_seen", "instruct_held_out",
                                                                 "triage_exact"))


# -----------------------------------------------------------------------------
# The claims table: computed from the results files, never by hand


def run_claims(results, out):
    return subprocess.run([sys.executable, str(ROOT / "lab" / "claims.py"), "--results", str(results), "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_claims_regenerate_the_committed_files_exactly(tmp_path):
    r = run_claims(ROOT / "results", tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("claims.json", "claims.md"):
        assert (tmp_path / name).read_text() == (ROOT / "results" / name).read_text(), name
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["claim"] for c in claims] == list(range(1, 13))
    keys = {"claim", "text", "experiment", "metric", "effect", "ci", "n", "seeds", "verdict"}
    assert all(keys <= set(c) for c in claims)
    for c in claims:  # each verdict follows from its interval by the stated rule
        low, high = c["ci"]
        want = "supported" if low > 0 else "contradicted" if high < 0 else "inconclusive"
        assert c["verdict"] == want and low <= c["effect"] <= high, c


def test_a_damaged_results_file_is_one_line_naming_it(tmp_path):
    for f in set((ROOT / "results").glob("*.json")) - {ROOT / "results" / "claims.json"}:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "masking.json").write_text('{"results": [')  # cut short
    r = run_claims(tmp_path, tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "masking.json:1: not valid JSON" in err[0], r.stderr
    assert not (tmp_path / "claims.json").exists()


def test_the_readme_shows_the_claims_table_first_in_its_lab_section():
    readme = (ROOT / "README.md").read_text()
    lab = readme.split("## Lab: the claims, measured", 1)[1].split("\n### ", 2)
    table = next(b for b in (ROOT / "results" / "claims.md").read_text().split("\n\n") if b.startswith("| #"))
    assert lab[1].startswith("The twelve claims") and table in lab[1]


def test_every_claim_number_in_the_prose_is_claims_json():
    """A sentence of README.md or results/README.md that quotes a claim's effect and interval ("claim 1:
    +0.09 [+0.06, +0.13]", "claim 3's +33 points [+25, +40]", "+0.42 [+0.34, +0.50] (claim 4") quotes
    results/claims.json at the precision it prints: a re-computed interval leaves no stale copy."""
    claims = {c["claim"]: c for c in json.loads((ROOT / "results" / "claims.json").read_text())}
    num = r"([+-]\d+(?:\.\d+)?)"
    quoted = []
    for path in ("README.md", "results/README.md"):
        text = " ".join((ROOT / path).read_text().split())
        for m in re.finditer(rf"claim (\d+)\D{{0,20}}?{num}( points)?[a-z ]*\[{num}, {num}\]", text):
            quoted.append((path, int(m[1]), m[2], bool(m[3]), m[4], m[5]))
        for m in re.finditer(rf"{num} \[{num}, {num}\] \(claim (\d+)", text):
            quoted.append((path, int(m[4]), m[1], False, m[2], m[3]))
    assert len(quoted) >= 10
    for path, claim, effect, points, low, high in quoted:
        c, places = claims[claim], len(effect.partition(".")[2])
        want = tuple(f"{v * (100 if points else 1):+.{places}f}" for v in (c["effect"], *c["ci"]))
        assert (effect, low, high) == want, (path, claim)


def test_the_readme_ladder_table_is_results_ladder():
    """Section 8 shows results/ladder/README.md's table, every rate with its interval, as lab/ladder.sh last
    wrote it: the two cannot drift apart."""
    readme = (ROOT / "README.md").read_text().split("### 8. When not to fine-tune", 1)[1].split("\n### ")[0]
    table = next(b for b in (ROOT / "results" / "ladder" / "README.md").read_text().split("\n\n")
                 if b.startswith("| run |"))
    assert table in readme


def test_the_readme_headline_table_quotes_results_headline_md():
    """The README's first table is results/headline.md's: each run's exact match and valid JSON with their
    intervals, its field accuracies, perplexity and KL, so the two cannot drift apart."""
    readme = (ROOT / "README.md").read_text().split("## Results: does fine-tuning work", 1)[1].split("\n## ")[0]
    md = (ROOT / "results" / "headline.md").read_text()
    rows = {c[0].strip(): [x.strip() for x in c[1:10]]
            for c in (line.strip("|").split(" | ") for line in md.splitlines() if line.startswith("| "))}
    for name, shown in (("base (no tuning)", "base, zero-shot"), ("LoRA (r=16, lr 5e-4)", "LoRA (r=16, lr 5e-4;"),
                        ("full fine-tune (lr 5e-5)", "full fine-tune (lr 5e-5)")):
        ours = rows[name]
        line = next(ln for ln in readme.splitlines() if ln.startswith(f"| {shown}"))
        cells = [c.strip().replace("**", "") for c in line.strip("|").split(" | ")][1:10]
        assert cells[:2] == ours[:2], name  # exact match and valid JSON, with their intervals
        assert cells[2:6] == [c.split(" [")[0] for c in ours[2:6]], name  # the four fields
        assert cells[6] == ours[6] and cells[7].removesuffix(" nats/token") == ours[7], name  # perplexity, KL


def test_every_rate_interval_in_the_readme_is_a_results_files():
    """Each README table row's rates with intervals ("12% [9, 17]") are, in order, a row of some results .md,
    so a re-rendered results file cannot leave a stale interval behind in the README. The first versions'
    one-seed tables (40 items, no per-item scores) are exempt only where each interval is Wilson's over 40."""
    from plumbing.intervals import wilson

    rate = re.compile(r"^(\d+)% \[(\d+), (\d+)\]$")
    files = sorted((ROOT / "results").glob("*.md")) + sorted((ROOT / "results").glob("*/README.md"))
    rows = [cells_of(line) for f in files for line in f.read_text().splitlines() if line.startswith("|")]

    def first_version(cell):  # p% [low, high] as Wilson's over some k of 40 items
        p, low, high = map(int, rate.match(cell).groups())
        return any(round(100 * k / 40) == p and [round(100 * x) for x in wilson(k, 40)[1:]] == [low, high]
                   for k in range(41))

    checked = 0
    for line in (ROOT / "README.md").read_text().splitlines():
        rates = [c for c in cells_of(line) if rate.match(c)] if line.startswith("|") else []
        if rates:
            quoted = any(all(c in iter_row for c in rates) for iter_row in map(iter, rows))
            assert quoted or all(map(first_version, rates)), f"README row quotes no results file: {line}"
            checked += 1
    assert checked > 40


def test_claims_on_quick_outputs(quick_gguf, quick_dir):
    """CI's run of the claims script on the --quick outputs: the claims those experiments test get a
    number, an interval and a verdict; the others say they have not run."""
    for script, name, *flags in (("masking.py", "masking"), ("quality.py", "quality"),
                                 ("headline.py", "headline", "--seeds", "1,2")):
        if not (quick_dir / f"{name}.json").exists():  # when this test runs alone
            assert run_lab(script, quick_dir, *flags).returncode == 0
    r = run_claims(quick_dir, quick_dir)
    assert r.returncode == 0, r.stderr
    claims = {c["claim"]: c for c in json.loads((quick_dir / "claims.json").read_text())}
    assert all(claims[k]["verdict"] in ("supported", "contradicted", "inconclusive") for k in (1, 2, 8, 10, 11))
    assert claims[11]["seeds"] == 2 and "paired bootstrap" in claims[11]["method"]
    assert claims[5]["verdict"] == "not measured" and claims[5]["settle"]


def test_quick_without_out_never_writes_into_results(quick_gguf, tmp_path):
    """--quick's numbers mean nothing: without --out they go to a temporary directory, not over the real
    results in results/ (git status stays clean)."""
    before = {p.name: p.read_bytes() for p in (ROOT / "results").glob("masking.*")}
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, str(ROOT / "lab" / "masking.py"), "--quick"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "handtune-lab-quick" / "masking.json").is_file()
    assert {p.name: p.read_bytes() for p in (ROOT / "results").glob("masking.*")} == before


def test_seeds_are_cached_as_they_finish_and_merged_with_per_item_scores(quick_gguf, tmp_path):
    r = run_lab("masking.py", tmp_path, "--seeds", "1,2")
    assert r.returncode == 0, r.stderr[-2000:]
    cache = sorted((tmp_path / "cache" / "masking").glob("*.json"))
    assert len(cache) == 6 and all(p.name.endswith(("-s1.json", "-s2.json")) for p in cache)
    report = json.loads((tmp_path / "masking.json").read_text())
    row = report["results"][0]
    assert row["seeds"] == [1, 2] and len(row["items"]["exact_match"]) == 2
    assert len(row["items"]["stops"][0]) == report["config"]["eval_items"]
    assert report["seeds"] == [1, 2] and report["commit"] and "cpu_flags" in report
    first = (tmp_path / "masking.json").read_text()
    r = run_lab("masking.py", tmp_path, "--seeds", "1,2")  # a second sitting: every run is cached
    assert r.returncode == 0 and r.stdout.count(": cached (") == 6
    assert json.loads((tmp_path / "masking.json").read_text())["results"] == json.loads(first)["results"]
    assert "6 runs loaded from cache/" in (tmp_path / "masking.md").read_text()


def test_a_run_with_nothing_random_is_run_once_and_cached_for_every_seed(tmp_path):
    """cached_runs(..., same_for_every_seed=True): the base model is measured once, not once per seed, and
    each seed still gets its own cache file (so a later sitting with more seeds resumes the same way). A
    finished run's Resume folder is deleted once its result is cached."""
    import types

    import common

    cfg = common.LabConfig(out=str(tmp_path), seeds="1,2,3")
    lab, calls = types.SimpleNamespace(cfg=cfg, rt=types.SimpleNamespace(dtype="float32"), cached=0, fresh=0), []
    runs = common.cached_runs(lab, "t", "base", lambda seed: calls.append(seed) or {"x": 1},
                              same_for_every_seed=True)
    assert calls == [1] and [r["seed"] for r in runs] == [1, 2, 3] and all(r["x"] == 1 for r in runs)
    assert len(list((tmp_path / "cache" / "t").glob("*-s[123].json"))) == 3
    runs = common.cached_runs(lab, "t", "tuned", lambda seed: calls.append(seed) or {"x": seed})
    assert calls == [1, 1, 2, 3] and [r["x"] for r in runs] == [1, 2, 3]
    common.cached_runs(lab, "t", "tuned", lambda seed: calls.append(seed))  # a second sitting: all loaded
    assert calls == [1, 1, 2, 3] and lab.cached == 3
    partial = common.run_path(lab, "t", "long", 2) + ".partial"  # a Resume folder a killed sitting left
    os.makedirs(os.path.join(partial, "ckpt"))
    common.cached_runs(lab, "t", "long", lambda seed: {"x": seed})
    assert not os.path.exists(partial) and os.path.isfile(common.run_path(lab, "t", "long", 2) + ".json")
    with open(common.run_path(lab, "t", "long", 1) + ".json", "w") as f:
        f.write("[]\n")  # not a run's result
    with pytest.raises(ValueError, match=r"-s1.json: not an object with seed; delete it to run this again"):
        common.cached_runs(lab, "t", "long", lambda seed: {"x": seed})


def test_error_bars_are_over_items_and_seeds_and_absent_without_per_item_scores():
    import common
    from plumbing.intervals import item_rate, wilson

    scored = {"exact_match": 0.25, "items": {"exact_match": [[1, 0, 0, 0], [0, 1, 0, 0]]}}
    old = {"exact_match": 0.4}  # a first-version row: its rate only
    rates, (below, above) = common.rate_bars([scored, old], "exact_match")
    rate, low, high = item_rate([[1, 0, 0, 0], [0, 1, 0, 0]])
    assert rates == [100 * rate, 40.0] and below == [100 * (rate - low), 0.0] and above == [100 * (high - rate), 0.0]
    # 2 seeds of 4 items are 4 items, not 8: at least as wide as Wilson's over the 4 items' means
    assert (low, high) != wilson(2, 8)[1:] and low <= wilson(1, 4)[1] and high >= wilson(1, 4)[2]
    assert common.rate_text(scored, "exact_match") == f"25% [{100 * low:.0f}, {100 * high:.0f}]"


def test_a_re_rendering_names_the_machine_that_computed_the_runs(tmp_path):
    """Every run from cache/ and the same configuration: the results keep the first sitting's hardware,
    flags, dtype and date (also through a second re-rendering); a sitting that ran anything, or another
    configuration, names its own."""
    import dataclasses
    import types

    import common

    @dataclasses.dataclass
    class Cfg:
        out: str = str(tmp_path)
        seeds: str = "1,2"
        lora_dropout: float = 0.0  # a setting added after the first results

    lab = types.SimpleNamespace(cfg=Cfg(lora_dropout=0.05), fresh=0, cached=3)
    first = {"config": {"out": str(tmp_path), "seeds": "1,2"}, "hardware": "a bf16 CPU", "cpu_flags": ["avx512_bf16"],
             "device": "cpu", "dtype": "bfloat16", "commit": "abc", "date": "2026-12-03", "computed": None}
    (tmp_path / "x.json").write_text(json.dumps(first))
    computed = common.computed_on(lab, "x")
    assert computed == {k: first[k] for k in ("hardware", "cpu_flags", "device", "dtype", "date")}
    (tmp_path / "x.json").write_text(json.dumps({**first, "hardware": "an AVX2 CPU", "computed": computed}))
    assert common.computed_on(lab, "x") == computed
    assert common.computed_on(types.SimpleNamespace(**{**vars(lab), "cfg": Cfg(seeds="1")}), "x") is None
    assert common.computed_on(types.SimpleNamespace(**{**vars(lab), "fresh": 1}), "x") is None
    assert common.computed_on(lab, "y") is None  # no earlier results
    (tmp_path / "z.json").write_text('{"config": {"out"')  # cut short: no provenance, no traceback
    assert common.computed_on(lab, "z") is None
    (tmp_path / "z.json").write_text("[1, 2]")  # JSON, but not a results file
    assert common.computed_on(lab, "z") is None


def test_far_held_out_families_are_whole_skills_missing_from_training():
    from tasks.instruct import FAR_HELD_OUT, HELD_OUT_FAMILIES, INSTRUCT_FAMILIES, build_instruct

    splits = build_instruct(held_out=FAR_HELD_OUT)
    trained = {f for r in splits["train"] for f in r["family"].split("+")}
    assert trained == set(INSTRUCT_FAMILIES) - set(FAR_HELD_OUT)
    assert {r["family"] for r in splits["test"]} >= set(FAR_HELD_OUT)
    # the default held-out families each have a sibling in training; the far ones have none
    assert {"sort_ascending", "min_number", "bullet_list"} <= trained and set(HELD_OUT_FAMILIES) & trained
    assert not any(f in trained for f in ("uppercase", "lowercase", "capitalize_words", "acronym", "date_iso"))


def test_lab_errors_are_one_line(tmp_path):
    r = run_lab("quality.py", tmp_path, "--model", tmp_path / "missing")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and "missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for bad in (["--methods", "lora,ful"], ["--sizes", "abc"]):  # a typo must not train something else
        r = run_lab("data_size.py", tmp_path, *bad)
        err = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(err) == 1 and err[0].startswith("error: --sizes") and bad[1] in err[0]


# -----------------------------------------------------------------------------
# The lab trains with train.py's own pieces: same losses, same adapter as `python train.py`


def test_lab_finetune_is_train_py_step_for_step(tiny_model_dir, chats, tmp_path):
    import common

    import lora

    out = str(tmp_path / "run")
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--grad-accum": 1, "--max-steps": 5, "--val-data": chats,
                                                              "--eval-every": 0})) == 0
    logged = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]

    cfg = common.LabConfig(model=tiny_model_dir, batch_size=2, device="cpu", dtype="float32")
    lab = common.setup(cfg)
    convs = [json.loads(line)["messages"] for line in open(chats)]
    model, losses = common.finetune(lab, convs, 5, lr=1e-2, warmup=2, lora_dropout=0.2)
    assert losses == pytest.approx(logged, rel=1e-6, abs=0)
    reference = copy.deepcopy(from_pretrained(tiny_model_dir))
    lora.load_adapter(reference, os.path.join(out, "adapter"))
    want, got = lora.lora_state_dict(reference), lora.lora_state_dict(model)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_a_lab_run_killed_mid_way_resumes_to_the_same_result(tiny_model_dir, chats, tmp_path, monkeypatch):
    """finetune with a Resume, killed after step 3 (checkpoint at step 2), then called again: the same
    losses and weights as a run never stopped (the data position, optimizer and dropout's generator all
    restored). A checkpoint of other settings is refused; without one, a run starts at step 0."""
    import common

    import lora
    import train

    cfg = common.LabConfig(model=tiny_model_dir, batch_size=2, device="cpu", dtype="float32")
    lab = common.setup(cfg)
    convs = [json.loads(line)["messages"] for line in open(chats)]
    settings = dict(lr=1e-2, warmup=2, lora_dropout=0.2)
    want_model, want = common.finetune(lab, convs, 6, **settings)

    real_step, calls = train.train_step, []

    def dies_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a session's end, mid-step
        return real_step(*args, **kwargs)

    resume = common.Resume(str(tmp_path / "run.partial"), every=2)
    monkeypatch.setattr(train, "train_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        common.finetune(lab, convs, 6, resume=resume, **settings)
    monkeypatch.setattr(train, "train_step", real_step)
    assert sorted(os.listdir(tmp_path / "run.partial" / "ckpt")) == ["latest", "step_0000002"]
    again = common.Resume(str(tmp_path / "run.partial"), every=2)
    model, losses = common.finetune(lab, convs, 6, resume=again, **settings)
    assert losses == want and again.earlier_s > 0
    want_sd, got_sd = lora.lora_state_dict(want_model), lora.lora_state_dict(model)
    for k in want_sd:
        torch.testing.assert_close(got_sd[k], want_sd[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="other training settings"):
        other = {**settings, "lr": 2e-2}
        common.finetune(lab, convs, 6, resume=common.Resume(str(tmp_path / "run.partial")), **other)
    _, fresh = common.finetune(lab, convs, 6, resume=common.Resume(str(tmp_path / "new.partial")), **settings)
    assert fresh == want
    (tmp_path / "run.partial" / "losses.json").write_text('{"losses": [2.1, 2.0')  # cut short
    with pytest.raises(ValueError, match=r"losses.json: cannot be read .*; delete .*run.partial to start"):
        common.finetune(lab, convs, 6, resume=common.Resume(str(tmp_path / "run.partial")), **settings)


# -----------------------------------------------------------------------------
# The triage generator's knobs


def template_regex(template):
    """A PROBLEMS sentence as a regex: its fixed words literally, each {slot} as anything."""
    return re.compile("".join(".+?" if part.startswith("{") else re.escape(part)
                              for part in re.split(r"(\{\w+\})", template)), re.IGNORECASE)


def test_triage_knobs_narrow_the_variety():
    """(That the default output is unchanged: tests/test_data.py regenerates the shipped files byte for byte.)"""
    from tasks.triage import NAMES, OPENERS, PROBLEMS, PRODUCT_NAMES, build_triage

    few = build_triage(seed=1, n_train=200, n_val=0, n_test=0, templates=(0,), n_names=2, n_mentions=1,
                       frame=False)["train"]
    for r in few:
        text, label = r["messages"][1]["content"], json.loads(r["messages"][2]["content"])
        assert template_regex(PROBLEMS[label["category"]][0][0]).search(text), text
        assert not any(text.startswith(o) for o in OPENERS) and not any(n in text for n in NAMES[2:])
        assert not any(m.lower() in text.lower() for m in PRODUCT_NAMES[label["product"]][1:]), text
    unseen = build_triage(seed=2, n_train=200, n_val=0, n_test=0, templates=(3, 4, 5, 6, 7))["train"]
    for r in unseen:
        text, category = r["messages"][1]["content"], json.loads(r["messages"][2]["content"])["category"]
        assert not any(template_regex(t).search(text) for t, _ in PROBLEMS[category][:3]), text
    with pytest.raises(ValueError, match="category feature_request has no PROBLEMS sentence"):
        build_triage(n_train=200, n_val=0, n_test=0, templates=(5,))  # feature_request has 5


def test_triage_knobs_that_allow_too_few_messages_are_an_error_not_an_endless_loop(monkeypatch):
    import tasks.triage as triage

    label = {"category": "bug", "priority": "low", "product": "router", "sentiment": "neutral"}
    monkeypatch.setattr(triage, "triage_example", lambda rng, **knobs: ("the same message", label))
    with pytest.raises(ValueError, match="too few distinct messages for 2"):
        triage.build_triage(n_train=2, n_val=0, n_test=0, frame=False)


def test_the_lab_trains_with_train_pys_lora_dropout_and_keys_other_dropouts_apart():
    """LabConfig's help says its LoRA dropout is train.py's default; the cache keys of runs at another
    dropout than the first sweeps' 0.05 say so, so those never read each other's files."""
    import common

    import train
    assert common.LabConfig().lora_dropout == train.TrainConfig().lora_dropout

    class Lab:
        cfg = common.LabConfig()
    assert common.dropout_suffix(Lab) == "-dropout0"
    Lab.cfg.lora_dropout = 0.05
    assert common.dropout_suffix(Lab) == ""


def test_a_run_cached_at_one_dtype_is_never_read_at_another(tmp_path):
    """Every committed sweep ran in bf16; a float32 run (what a CPU without native bf16 picks) trains
    its own runs and never renders a bf16 result as its own."""
    from types import SimpleNamespace

    import common
    cfg = common.LabConfig(out=str(tmp_path), seeds="1337", quick=False)
    lab = SimpleNamespace(cfg=cfg, rt=SimpleNamespace(dtype="bfloat16"), cached=0, fresh=0)
    assert common.cached_runs(lab, "x", "cfg", lambda seed: {"acc": 0.5}) == [{"seed": 1337, "acc": 0.5}]
    names = [p.name for p in (tmp_path / "cache" / "x").iterdir()]
    assert names == [f"{os.path.basename(cfg.model)}-cfg-dropout0-s1337.json"]  # bf16: the committed names
    lab.rt.dtype = "float32"
    assert common.cached_runs(lab, "x", "cfg", lambda seed: {"acc": 0.25})[0]["acc"] == 0.25  # run, not read
    lab.rt.dtype = "bfloat16"
    assert common.cached_runs(lab, "x", "cfg", lambda seed: {"acc": 0.0})[0]["acc"] == 0.5  # read back
    assert lab.cached == 1 and len(list((tmp_path / "cache" / "x").iterdir())) == 2


def test_text_measures_see_a_narrow_vocabulary_and_a_character_loop():
    import common

    prose = "The router drops the connection every evening, so I restarted it twice and it still fails."
    assert common.char_repeats("!" * 60) >= 0.75 and common.char_repeats(prose) < 0.3
    assert common.distinct(["a b a b", "a b"], 1) == 2 / 6 and common.distinct(["x y z"], 2) == 1.0
    assert common.word_entropy(["a a a a"]) == 0 and common.word_entropy(["a b c d"]) == 2.0
    assert common.trigrams("One two three four") == ["one two three", "two three four"]


def test_compare_runs_pairs_two_cached_runs_item_by_item(tmp_path):
    """scripts/compare_runs.py reads two lab cache files' per-item scores: each side's rate with its interval
    (one seed: Wilson's), the paired difference with its bootstrap interval, and bad input as one error line."""
    from conftest import one_error_line, run_limited
    from plumbing.intervals import paired_bootstrap, wilson

    a_items, b_items = [1] * 30 + [0] * 10, [1] * 10 + [0] * 30  # A right on 30 of 40, B on 10 (a subset)
    (tmp_path / "a.json").write_text(json.dumps({"seed": 1, "items": {"exact_match": a_items, "valid": [1] * 40}}))
    (tmp_path / "b.json").write_text(json.dumps({"seed": 1, "items": {"exact_match": b_items, "valid": [1] * 40}}))
    r = run_limited(["scripts/compare_runs.py", "-a", tmp_path / "a.json", "-b", tmp_path / "b.json"])
    assert r.returncode == 0, r.stderr
    d, low, high = paired_bootstrap([a_items], [b_items])
    _, la, ha = wilson(30, 40)
    assert d == 0.5 and low > 0 and r.stdout.splitlines()[0] == (
        f"exact_match: A 75.0% [{la:.1%}, {ha:.1%}]  B 25.0% [{wilson(10, 40)[1]:.1%}, {wilson(10, 40)[2]:.1%}]  "
        f"A - B +0.500 [{low:+.3f}, {high:+.3f}]  (a difference; 40 items)")
    assert r.stdout.splitlines()[1].endswith("A - B +0.000 [+0.000, +0.000]  (no difference seen; 40 items)")

    (tmp_path / "old.json").write_text(json.dumps({"seed": 1, "exact_match": 0.5}))  # cached before items
    (tmp_path / "short.json").write_text(json.dumps({"items": {"exact_match": [1] * 39}}))
    for args, needle in (((tmp_path / "old.json", tmp_path / "b.json"), "no per-item scores"),
                         ((tmp_path / "short.json", tmp_path / "b.json"), "different numbers of items"),
                         ((f"{tmp_path / 'a.json'},{tmp_path / 'a.json'}", tmp_path / "b.json"), "A has 2 seeds"),
                         ((tmp_path / "a.json", tmp_path / "missing.json"), "missing.json")):
        one_error_line(run_limited(["scripts/compare_runs.py", "-a", args[0], "-b", args[1]]), needle)
    one_error_line(run_limited(["scripts/compare_runs.py", "-a", tmp_path / "a.json", "-b", tmp_path / "b.json",
                                "--metric", "kl"]), "--metric kl", "kept: exact_match, valid")
