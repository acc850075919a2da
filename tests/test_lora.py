"""Tests for lora.py: the LoRA math and init facts, freezing, merge/unmerge, and adapters that round-trip
exactly and interoperate with Hugging Face PEFT and transformers (those tests skip when the packages are
missing). Tiny random models only: hermetic, offline, a few seconds on a CPU.

    python -m pytest tests/test_lora.py
"""

import json
import math
import os

import pytest
import torch
import torch.nn as nn
from conftest import randomize_lora
from torch.nn import functional as F

from lora import (LoRALinear, LoRASummary, apply_lora, load_adapter, load_lora_state_dict,
                  lora_layers, lora_parameters, lora_state_dict, merge_lora, save_adapter)
from model import GPT, PRESETS, GPTConfig, from_pretrained, save_pretrained
from plumbing.peft_format import read_adapter_config
from plumbing.safetensors_io import load_safetensors

TINY = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)  # shared by every tiny model


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))




def tokens(seed=0, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=g)


def safetensors_metadata(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__")


@pytest.fixture(scope="module")
def hf_base_dir(tmp_path_factory):
    """A tiny random GPT-2 written by transformers itself, so loading it exercises the real layout."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=TINY["vocab_size"], n_positions=TINY["block_size"],
                                  n_embd=TINY["n_embd"], n_layer=TINY["n_layer"], n_head=TINY["n_head"],
                                  bos_token_id=TINY["vocab_size"] - 1, eos_token_id=TINY["vocab_size"] - 1)
    d = tmp_path_factory.mktemp("hf_base")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return str(d)


def hf_logits(hf_model, idx):
    hf_model.eval()
    with torch.no_grad():
        return hf_model(idx).logits


# -----------------------------------------------------------------------------
# LoRALinear: init, scale, dropout, merge


def test_fresh_layer_is_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer.lora_B, torch.zeros(40, 4))  # B = 0 ...
    assert torch.equal(layer(x), base(x))  # ... so the update is exactly zero at the start
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (40, 4)


def test_scaling_is_alpha_over_rank_and_used_in_forward():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, rank=8, alpha=16)
    assert layer.scaling == 2.0
    assert LoRALinear(nn.Linear(16, 12), rank=16, alpha=16).scaling == 1.0  # alpha fixed, r doubled: halved
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(4, 16)
    expected = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A, rtol=0, atol=0)


def test_A_init_is_kaiming_uniform_like_nn_linear():
    torch.manual_seed(0)
    fan_in = 768
    layer = LoRALinear(nn.Linear(fan_in, 64), rank=64, alpha=16)
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): sqrt(3) * sqrt(2 / (1 + 5)) / sqrt(fan_in)
    A = layer.lora_A.detach()
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.99 * bound  # uses the whole range: 49k draws
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.01 * bound  # uniform: std = bound / sqrt(3)
    # the same distribution nn.Linear's own default init gives its weight
    assert A.abs().max() <= 1 / math.sqrt(nn.Linear(fan_in, 64).weight.size(1))


def test_base_frozen_lora_trainable():
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=4)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A", "lora_B"]


def test_first_step_only_B_gets_a_gradient():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=4, dropout=0.0)
    layer(torch.randn(5, 8)).pow(2).sum().backward()
    assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))  # multiplied by B = 0
    assert layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


def test_dropout_only_on_lora_input_and_only_in_train_mode():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.5)
    x = torch.randn(6, 32)
    # B = 0: the frozen path is untouched by dropout even in train mode
    layer.train()
    assert torch.equal(layer(x), base(x))
    nn.init.normal_(layer.lora_B)
    clean = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    dropped = base(x) + (F.dropout(x, 0.5, training=True) @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(y, dropped, rtol=0, atol=1e-6)  # dropout on x, only inside the LoRA term
    assert not torch.allclose(y, clean)
    layer.eval()
    torch.testing.assert_close(layer(x), clean, rtol=0, atol=1e-6)  # eval: no dropout, deterministic
    assert torch.equal(layer(x), layer(x))


def test_recomputed_dropout_gives_the_gradient_of_the_mask_used_in_forward():
    """Training recomputes the branch in backward (no stored mask): the replayed mask must be the one the
    forward drew, so the gradients equal those of the branch written out with that mask."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), rank=4, alpha=8, dropout=0.5).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 32, requires_grad=True)
    torch.manual_seed(7)
    layer(x).square().sum().backward()
    got = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    torch.manual_seed(7)
    written_out = layer.base(x) + (F.dropout(x, 0.5, training=True) @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    written_out.square().sum().backward()
    for g, t in zip(got, (x, layer.lora_A, layer.lora_B)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-6)


def saved_bytes_per_token_per_block(full, dropout, autocast_dtype):
    """Bytes autograd keeps for backward per token per block (the slope over batch size and depth, so
    weights and their autocast copies drop out), at gpt2's width and train.py's LoRA rank."""
    kept = {}
    for B in (2, 4):
        for n_layer in (1, 2):
            torch.manual_seed(0)
            m = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=n_layer, n_head=12, n_embd=768)).train()
            m.requires_grad_(True) if full else apply_lora(m, 16, 32.0, dropout)
            params = {p.untyped_storage().data_ptr() for p in m.parameters()}
            storages = {}

            def keep(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            x = torch.randint(0, 128, (B, 16))
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                    torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)):
                m(x, x)[1].backward()
            kept[B, n_layer] = sum(n for ptr, n in storages.items() if ptr not in params)
    return ((kept[4, 2] - kept[4, 1]) - (kept[2, 2] - kept[2, 1])) / (2 * 16)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_lora_keeps_no_more_per_token_than_a_full_fine_tune(autocast_dtype):
    """With or without dropout: the branch is recomputed in backward, so LoRA keeps one copy of each
    adapted layer's input, as full fine-tuning does for its weight gradient."""
    full = saved_bytes_per_token_per_block(True, 0.0, autocast_dtype)
    assert full > 0
    for dropout in (0.0, 0.05):
        assert saved_bytes_per_token_per_block(False, dropout, autocast_dtype) <= full


def test_merge_unmerge_layer():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = LoRALinear(base, rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(3, 16)
    w0 = base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight(), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-5)
    w1 = base.weight.detach().clone()
    layer.merge()  # idempotent
    assert torch.equal(base.weight, w1)
    layer.unmerge()
    layer.unmerge()  # idempotent
    assert not layer.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def test_unmerge_is_lossy_in_bf16():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64).to(torch.bfloat16), rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert not torch.equal(layer.base.weight, w0)  # low bits of W were rounded away while merged


def test_eval_does_not_merge():
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    w0 = layer.base.weight.detach().clone()
    layer.eval()
    layer.train()
    layer.eval()
    assert not layer.merged and torch.equal(layer.base.weight, w0)


def test_merged_layer_gives_lora_no_gradient():
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    layer.merge()
    assert not layer(torch.randn(2, 8)).requires_grad  # A and B are not in the graph: nothing to train
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.lora_A.grad is None and layer.lora_B.grad is None


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(8, 8), rank=0, alpha=4)


# -----------------------------------------------------------------------------
# apply_lora on a GPT


def test_apply_lora_wraps_targets_and_freezes_the_rest():
    model = tiny_gpt()
    summary = apply_lora(model, rank=4, alpha=8, dropout=0.0)
    C, L = TINY["n_embd"], TINY["n_layer"]
    expected_layers = [f"transformer.h.{i}.{s}" for i in range(L)
                       for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert summary.layers == expected_layers  # "c_proj" matches both attention's and the MLP's
    assert [n for n, _ in lora_layers(model)] == expected_layers
    assert not isinstance(model.lm_head, LoRALinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert "transformer.h.0.attn.c_attn.lora_A" in trainable
    assert "transformer.h.0.attn.c_attn.base.weight" in dict(model.named_parameters())
    assert not model.transformer.wte.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    r = 4  # per layer: c_attn (C -> 3C), attn.c_proj (C -> C), c_fc (C -> 4C), mlp.c_proj (4C -> C)
    per_layer = r * (C + 3 * C) + r * (C + C) + r * (C + 4 * C) + r * (4 * C + C)
    assert summary.trainable == L * per_layer == sum(p.numel() for p in lora_parameters(model))
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.percent == pytest.approx(100 * summary.trainable / summary.total)
    assert f"{summary.trainable:,} trainable of {summary.total:,}" in str(summary)
    assert isinstance(summary, LoRASummary)


def test_apply_lora_refuses_bad_targets_and_double_wrapping():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="no Linear layer"):
        apply_lora(model, targets=("c_nothing",))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        apply_lora(model, targets=("attn",))  # the attention module itself
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, targets=("c_fc", "lm_head"))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_apply_lora_regex_targets_like_peft():
    model = tiny_gpt()
    summary = apply_lora(model, targets=r".*\.h\.1\.attn\.c_attn")
    assert summary.layers == ["transformer.h.1.attn.c_attn"]


def test_fresh_lora_logits_identical_to_base(hf_base_dir):
    model = from_pretrained(hf_base_dir).eval()
    idx = tokens()
    with torch.no_grad():
        before = model(idx)
        apply_lora(model)
        after = model(idx)
    assert torch.equal(before, after)


def test_merged_model_forward_equals_unmerged(hf_base_dir):
    model = from_pretrained(hf_base_dir)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model)
    randomize_lora(model)
    model.eval()
    idx = tokens()
    with torch.no_grad():
        unmerged = model(idx)
        for _, m in lora_layers(model):
            m.merge()
        merged = model(idx)
        weights_once = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _, m in lora_layers(model):
            m.merge()
        twice = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _, m in lora_layers(model):
            m.unmerge()
    assert not torch.equal(unmerged, from_pretrained(hf_base_dir).eval()(idx))  # the adapter matters
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert all(torch.equal(weights_once[n], twice[n]) for n in weights_once)  # merging twice: no change
    for name, m in lora_layers(model):
        torch.testing.assert_close(m.base.weight, originals[f"{name}.weight"], rtol=0, atol=1e-6)


def test_optimizer_step_changes_only_lora_parameters(hf_base_dir):
    model = from_pretrained(hf_base_dir)
    apply_lora(model, dropout=0.1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The optimizer is given every parameter on purpose: freezing alone must keep the base model fixed.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    idx = tokens()
    for _ in range(2):  # two steps: at the first, A's gradient is zero (B = 0)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert model.transformer.wte.weight.grad is None
    for k in before:
        if "lora" in k:
            assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed but is frozen"
    assert "transformer.wte.weight" in before and "lm_head.weight" in before


# -----------------------------------------------------------------------------
# Checkpoints: lora_state_dict, adapters, merged export


def test_lora_state_dict_round_trip_and_refusal():
    model = tiny_gpt()
    apply_lora(model, rank=4)
    randomize_lora(model)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert all("lora" in k for k in sd) and len(sd) == 4 * 2 * TINY["n_layer"]
    other = tiny_gpt()
    apply_lora(other, rank=4)
    load_lora_state_dict(other, sd)
    assert all(torch.equal(sd[k], v) for k, v in lora_state_dict(other).items())
    bad = dict(sd, **{"transformer.h.0.attn.c_attn.lora_A": torch.zeros(5, TINY["n_embd"])})
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(other, bad)
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(other, {k: v for k, v in sd.items() if ".h.1." not in k})


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_gpt()
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    randomize_lora(model)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = read_adapter_config(tmp_path)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert config["fan_in_fan_out"] is True and config["bias"] == "none"
    assert config["base_model_name_or_path"] == "tiny"
    weights = os.path.join(tmp_path, "adapter_model.safetensors")
    assert safetensors_metadata(weights) == {"format": "pt"}

    fresh = tiny_gpt()  # same seed: the same base weights
    summary = load_adapter(fresh, tmp_path)
    assert summary.layers == [n for n, _ in lora_layers(model)]
    ours, theirs = lora_state_dict(model), lora_state_dict(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {m.lora_dropout.p for _, m in lora_layers(fresh)} == {0.1}
    model.eval()
    fresh.eval()
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(model(idx), fresh(idx))


def test_adapter_uses_peft_key_names_and_shapes(tmp_path):
    model = tiny_gpt()
    apply_lora(model, rank=4)
    save_adapter(model, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_safetensors(tmp_path / "adapter_model.safetensors").items()}
    C, r = TINY["n_embd"], 4
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == (r, C)
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (3 * C, r)
    assert shapes["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"] == (r, 4 * C)
    assert shapes["base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"] == (C, r)
    assert len(shapes) == 4 * 2 * TINY["n_layer"]


def test_partial_targets_are_saved_by_full_name(tmp_path):
    model = tiny_gpt()
    apply_lora(model, rank=2, targets=("mlp.c_proj",))  # "c_proj" alone would also select attn.c_proj
    randomize_lora(model)
    save_adapter(model, tmp_path)
    assert read_adapter_config(tmp_path)["target_modules"] == [
        f"transformer.h.{i}.mlp.c_proj" for i in range(TINY["n_layer"])]
    fresh = tiny_gpt()
    assert load_adapter(fresh, tmp_path).layers == [n for n, _ in lora_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(model).values(),
                                                  lora_state_dict(fresh).values()))


def test_load_adapter_refuses_other_base_models(tmp_path):
    wide = tiny_gpt(n_embd=64)
    apply_lora(wide)
    save_adapter(wide, tmp_path / "wide")
    narrow = tiny_gpt(n_embd=32)
    with pytest.raises(ValueError, match=r"has shape \(8, 64\), expected \(8, 32\)"):
        load_adapter(narrow, tmp_path / "wide")
    assert not lora_layers(narrow) and all(p.requires_grad for p in narrow.parameters())  # untouched
    with pytest.raises(ValueError, match="missing"):
        load_adapter(tiny_gpt(n_embd=64, n_layer=3), tmp_path / "wide")  # no weights for block 2
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(tiny_gpt(n_embd=64, n_layer=1), tmp_path / "wide")  # weights for a block it lacks


def test_load_adapter_refuses_what_it_does_not_implement(tmp_path):
    model = tiny_gpt()
    apply_lora(model)
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    for change, message in (({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "peft_type"),
                            ({"modules_to_save": ["lm_head"]}, "modules_to_save")):
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_adapter(tiny_gpt(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_gpt(), tmp_path / "nowhere")


def test_merge_lora_returns_a_plain_gpt(hf_base_dir):
    model = from_pretrained(hf_base_dir)
    plain_keys = list(model.state_dict())
    apply_lora(model)
    randomize_lora(model)
    merged = merge_lora(model)
    assert type(merged) is GPT and not lora_layers(merged)
    assert list(merged.state_dict()) == plain_keys  # GPT-2's names again: save_pretrained works
    assert all(p.requires_grad for p in merged.parameters())
    assert merged.lm_head.weight is merged.transformer.wte.weight
    assert lora_layers(model) and not any(m.merged for _, m in lora_layers(model))  # original untouched
    model.eval()
    merged.eval()
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), model(idx), rtol=0, atol=1e-5)


def test_merged_export_opens_in_transformers(hf_base_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = from_pretrained(hf_base_dir)
    apply_lora(model)
    randomize_lora(model)
    model.eval()
    save_pretrained(merge_lora(model), tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, idx), model(idx), rtol=0, atol=1e-4)


@pytest.mark.parametrize("targets", [("c_attn", "c_proj", "c_fc"), ("mlp.c_proj",)])
def test_peft_loads_our_adapter_with_equal_logits(hf_base_dir, tmp_path, targets):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = from_pretrained(hf_base_dir)
    summary = apply_lora(model, rank=4, alpha=8, targets=targets)
    randomize_lora(model)  # non-zero B: the adapter really changes the logits
    model.eval()
    save_adapter(model, tmp_path, base_model_name_or_path=hf_base_dir)
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_base_dir)
    idx = tokens()
    base_logits = hf_logits(base, idx)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    assert peft_model.peft_config["default"].r == 4
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer))
    assert wrapped == sorted(summary.layers)  # PEFT adapted exactly the layers we did
    with torch.no_grad():
        ours = model(idx)
    assert (ours - base_logits).abs().max() > 1e-2  # the comparison below is not trivially true
    torch.testing.assert_close(hf_logits(peft_model, idx), ours, rtol=0, atol=1e-4)


def test_peft_saved_adapter_loads_into_ours_with_equal_logits(hf_base_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(base, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(tmp_path)
    idx = tokens()
    expected = hf_logits(peft_model, idx)

    model = from_pretrained(hf_base_dir)
    summary = load_adapter(model, tmp_path)
    assert len(summary.layers) == 4 * TINY["n_layer"]
    assert {m.scaling for _, m in lora_layers(model)} == {16 / 4}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-4)


# -----------------------------------------------------------------------------
# Size: an adapter is a few megabytes, not a model copy


def test_gpt2_rank8_adapter_is_under_2_percent_of_the_model(tmp_path):
    config = PRESETS["gpt2"]
    with torch.device("meta"):  # GPT-2 small's shapes without initialising 124M weights
        model = GPT(config)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # what model.safetensors holds
    model.to_empty(device="cpu")  # memory for the weights, never written: only the LoRA tensors are used
    summary = apply_lora(model, rank=8)
    save_adapter(model, tmp_path)
    adapter_bytes = os.path.getsize(tmp_path / "adapter_model.safetensors")
    C, L, r = config.n_embd, config.n_layer, 8
    assert summary.trainable == L * r * (4 * C + 2 * C + 5 * C + 5 * C)  # 1,179,648
    assert 4 * summary.trainable < adapter_bytes < 4 * summary.trainable + 64 * 1024  # fp32 + a header
    assert adapter_bytes < 0.02 * base_bytes, f"{adapter_bytes / base_bytes:.2%}"
