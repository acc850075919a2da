"""The workshop's checker: every shipped stub fails with a plain message, handtune's own code passes, and
each classic SFT bug written the way a learner writes it is caught by its exercise's check with the hint
that names it.

    python -m pytest tests/test_workshop.py -q
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def check(tokenizer_dir, *args):
    return subprocess.run([sys.executable, "workshop/check.py", *map(str, args), "--tokenizer-dir",
                           str(tokenizer_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_reference_passes_every_exercise(gpt2_tokenizer_dir):
    r = check(gpt2_tokenizer_dir, "all", "--reference")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("  passed") == 8 and "FAIL" not in r.stdout


@pytest.mark.parametrize("n", range(1, 9))
def test_every_shipped_stub_fails_in_plain_words(gpt2_tokenizer_dir, n):
    r = check(gpt2_tokenizer_dir, n)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "not written yet" in r.stdout and "fill in the TODO in workshop/exercises/" in r.stdout


# Each classic bug, as a learner would write it: (exercise, code, the hint that must appear)
BUGS = {
    "mask on the user turn": (1, """
        def render_conversation(messages, tokenizer):
            ids, mask = [], []
            for i, m in enumerate(messages):
                ids.append(50256); mask.append(int(i > 0 and messages[i - 1]["role"] == "assistant"))
                h = tokenizer.encode_ordinary({"system": "System:\\n", "user": "User:\\n",
                                               "assistant": "Assistant:\\n"}[m["role"]])
                c = tokenizer.encode_ordinary(m["content"])
                ids += h + c
                mask += [0] * len(h) + [int(m["role"] != "system")] * len(c)   # BUG: user text trained
            ids.append(50256); mask.append(int(messages[-1]["role"] == "assistant"))
            return ids, mask
        """, "system/user text: context, never trained"),
    "no end-of-turn token": (1, """
        def render_conversation(messages, tokenizer):
            ids, mask = [], []
            for m in messages:
                ids.append(50256); mask.append(0)   # BUG: the EOT that ends a reply is never trained
                h = tokenizer.encode_ordinary({"system": "System:\\n", "user": "User:\\n",
                                               "assistant": "Assistant:\\n"}[m["role"]])
                c = tokenizer.encode_ordinary(m["content"])
                ids += h + c
                mask += [0] * len(h) + [int(m["role"] == "assistant")] * len(c)
            ids.append(50256); mask.append(0)
            return ids, mask
        """, "how the model learns to stop"),
    "unshifted labels": (2, """
        import torch
        def collate(examples, pad_id):
            B, T = len(examples), max(len(ids) for ids, _ in examples) - 1
            x = torch.full((B, T), pad_id); y = torch.full((B, T), -100)
            for b, (ids, mask) in enumerate(examples):
                n = len(ids) - 1
                x[b, :n] = torch.tensor(ids[:-1])
                y[b, :n] = torch.where(torch.tensor(mask[:-1]).bool(), torch.tensor(ids[:-1]), -100)  # BUG
            return x, y
        """, "unshifted"),
    "mean of means": (3, """
        def accumulate(model, micro_batches):
            total = 0.0
            for x, y in micro_batches:
                _, loss = model(x, y)                      # BUG: each batch's own mean ...
                (loss / len(micro_batches)).backward()     # ... averaged over batches
                total += float(loss) / len(micro_batches)
            return total
        """, "mean of per-batch means"),
    "B initialised randomly": (4, """
        import math, torch, torch.nn as nn
        class LoRALinear(nn.Module):
            def __init__(self, base, rank, alpha):
                super().__init__()
                self.base = base; self.base.requires_grad_(False); self.scaling = alpha / rank
                self.lora_A = nn.Parameter(torch.randn(rank, base.in_features))
                self.lora_B = nn.Parameter(torch.randn(base.out_features, rank))   # BUG: not zero
            def forward(self, x):
                return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling
        """, "B must start at zero"),
    "merge without alpha / r": (5, """
        def merged_weight(weight, lora_A, lora_B, alpha, rank):
            return weight + lora_B @ lora_A          # BUG: no alpha / rank
        def unmerged_weight(weight, lora_A, lora_B, alpha, rank):
            return weight - lora_B @ lora_A
        """, "left out the alpha / r scale"),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_each_classic_bug_is_caught_by_its_exercise(gpt2_tokenizer_dir, tmp_path, bug):
    n, code, hint = BUGS[bug]
    f = tmp_path / "mine.py"
    f.write_text(textwrap.dedent(code))
    r = check(gpt2_tokenizer_dir, n, "--file", f)
    assert r.returncode == 1 and "FAIL" in r.stdout and hint in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_a_learners_exception_is_one_line_with_where(gpt2_tokenizer_dir, tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def bm25_scores(documents, query, k1=1.5, b=0.75):\n    return 1 / 0\n")
    r = check(gpt2_tokenizer_dir, 7, "--file", f)
    assert r.returncode == 1 and "your code raised ZeroDivisionError" in r.stdout and "mine.py:2" in r.stdout


# -----------------------------------------------------------------------------
# see.py: each exercise plugged into the real pipeline (--quick: a tiny random model of SmolLM2's family)


def see(*args):
    return subprocess.run([sys.executable, "workshop/see.py", *map(str, args), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_every_see_run_works_with_handtunes_code(smollm2_gguf):
    r = see("all", "--reference")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("== see ") == 8 and "Traceback" not in r.stdout + r.stderr
    for shown in ("EOT not trained:", "unshifted labels: loss", "your accumulate vs one big batch",
                  "logits differ from the base model's by at most 0.00e+00", "unmerge(merge(W)) - W",
                  "lr        loss", "facts right", "your KL(base || tuned)"):
        assert shown in r.stdout, shown


def test_see_on_the_shipped_stubs_says_not_written_yet(smollm2_gguf):
    r = see("all")
    assert r.returncode == 1 and r.stdout.count("not written yet") == 8
    assert "Traceback" not in r.stdout + r.stderr


TEMPLATE = """
EOT_ID = 50256
HEADERS = {"system": "System:\\n", "user": "User:\\n", "assistant": "Assistant:\\n"}

def render_conversation(messages, tokenizer):
    ids, mask = [], []
    for i, m in enumerate(messages):
        ids.append(EOT_ID); mask.append(int(i > 0 and messages[i - 1]["role"] == "assistant"))
        h, c = tokenizer.encode_ordinary(HEADERS[m["role"]]), tokenizer.encode_ordinary(m["content"])
        ids += h + c
        mask += [0] * len(h) + [int(m["role"] == "assistant")] * len(c)
    ids.append(EOT_ID); mask.append(int(messages[-1]["role"] == "assistant"))
    return ids, mask
"""


def test_see_trains_a_learners_template_with_smollm2s_end_token(smollm2_gguf, tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text(TEMPLATE)
    r = see(1, "--file", mine)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "EOT trained:" in r.stdout and "EOT not trained:" in r.stdout and "a format SmolLM2 never saw" in r.stdout
    mine.write_text(TEMPLATE.replace("ids.append(EOT_ID)", "ids.append(50256)"))  # the id written out
    r = see(1, "--file", mine)
    assert r.returncode == 1 and "use EOT_ID, not the number 50256" in r.stdout and "Traceback" not in r.stderr


def test_the_notebook_runs_end_to_end(smollm2_gguf, gpt2_tokenizer_dir, monkeypatch):
    """workshop/workshop.ipynb executed as Jupyter would, with quick settings (a tiny random model and
    handtune's code in place of the learner's): every check passes and every see-run prints."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HANDTUNE_WORKSHOP_QUICK", "1")
    monkeypatch.setenv("HANDTUNE_TOKENIZER_DIR", str(gpt2_tokenizer_dir))
    nb = nbformat.read(ROOT / "workshop" / "workshop.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "workshop")}}).execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert out.count("  passed") == 8 and out.count("== see ") == 8 and "Traceback" not in out
