"""Tests for lora.py on the Llama block (SmolLM2): default targets per architecture, the LoRA facts on a tiny
grouped-query Llama, and adapters in PEFT's LlamaForCausalLM layout (base_model.model.model.layers.N.self_attn.
q_proj.lora_A.weight) that PEFT opens and that PEFT writes, checked by running PEFT and transformers on tiny
random checkpoints (those tests skip when the packages are missing). Hermetic, offline, seconds on a CPU.

    python -m pytest tests/test_lora_llama.py
"""

import json
import os

import pytest
import torch
from conftest import randomize_lora  # non-zero A and B, shared with GPT-2's LoRA tests

from lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, default_targets, hf_module_name,
                  load_adapter, lora_layers, lora_parameters, lora_state_dict, merge_lora,
                  save_adapter)
from model import GPT, LLAMA_SWITCHES, PRESETS, GPTConfig, from_pretrained, save_pretrained
from plumbing.peft_format import read_adapter_config
from plumbing.safetensors_io import load_safetensors

# A tiny SmolLM2: grouped-query attention (4 query heads share 2 K/V heads), tied embeddings, no biases.
LLAMA = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2 = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=32)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**LLAMA_SWITCHES, **{**LLAMA, **overrides}))


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**GPT2))


def tokens(seed=0, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, LLAMA["vocab_size"], (B, T), generator=g)


def hf_logits(hf_model, idx):
    hf_model.eval()
    with torch.no_grad():
        return hf_model(idx).logits


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (GQA, tied) written by transformers itself, every parameter randomised
    (norm weights too), so that loading it exercises the real layout."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=LLAMA["vocab_size"], hidden_size=LLAMA["n_embd"], intermediate_size=LLAMA["intermediate_size"],
        num_hidden_layers=LLAMA["n_layer"], num_attention_heads=LLAMA["n_head"],
        num_key_value_heads=LLAMA["n_kv_head"], max_position_embeddings=LLAMA["block_size"], rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.02))
    d = tmp_path_factory.mktemp("hf_llama")
    hf.save_pretrained(d)
    return str(d)


def load_base(base_dir):
    model = from_pretrained(base_dir)
    assert model.config.arch == "llama" and model.config.kv_heads < model.config.n_head
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


# -----------------------------------------------------------------------------
# Default targets per architecture


def test_default_targets_per_architecture():
    assert DEFAULT_TARGETS["gpt2"] == ("c_attn", "c_proj", "c_fc")
    assert DEFAULT_TARGETS["llama"] == LLAMA_TARGETS
    gpt2, llama = tiny_gpt2(), tiny_llama()
    assert default_targets(gpt2) == DEFAULT_TARGETS["gpt2"] and default_targets(llama) == LLAMA_TARGETS
    # GPT-2 without targets: as before, c_attn, both c_proj and c_fc
    assert apply_lora(gpt2).layers == [f"transformer.h.{i}.{s}" for i in range(GPT2["n_layer"])
                                       for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    summary = apply_lora(llama, rank=4, alpha=8)
    assert summary.layers == [f"transformer.h.{i}.{s}" for i in range(LLAMA["n_layer"])
                              for s in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    cfg, r = llama.config, 4
    C, kv, F = cfg.n_embd, cfg.kv_heads * cfg.head_size, cfg.mlp_width  # kv = 32: 2 K/V heads of size 16
    # per layer: q (C -> C), k and v (C -> kv under GQA), o (C -> C), gate and up (C -> F), down (F -> C)
    per_layer = r * (2 * C) + 2 * r * (C + kv) + r * (2 * C) + 2 * r * (C + F) + r * (F + C)
    assert summary.trainable == LLAMA["n_layer"] * per_layer == sum(p.numel() for p in lora_parameters(llama))
    assert not isinstance(llama.lm_head, LoRALinear) and llama.lm_head.weight is llama.transformer.wte.weight
    trainable = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)


def test_explicit_targets_still_win_and_wrong_family_names_say_what_exists():
    llama = tiny_llama()
    assert apply_lora(llama, targets=("q_proj", "v_proj")).layers == [
        f"transformer.h.{i}.attn.{p}" for i in range(LLAMA["n_layer"]) for p in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="no Linear layer.*this llama model's are down_proj, gate_proj, k_proj, "
                                         "o_proj, q_proj, up_proj, v_proj"):
        apply_lora(tiny_llama(), targets=DEFAULT_TARGETS["gpt2"])  # GPT-2's names on a Llama
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(tiny_llama(tie_embeddings=False), targets=("q_proj", "lm_head"))


def test_peft_default_for_llama_adapts_only_q_and_v(base_dir):
    """The footgun next to DEFAULT_TARGETS: a PEFT LoraConfig without target_modules adapts q_proj and v_proj
    only, under a quarter of the LoRA parameters our default gives the same model."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                     peft.LoraConfig(r=4, task_type="CAUSAL_LM"))
    assert sorted(peft_model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    theirs = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    ours = apply_lora(load_base(base_dir), rank=4).trainable
    assert 0 < theirs < ours / 4


# -----------------------------------------------------------------------------
# The LoRA facts on a Llama


def test_fresh_lora_logits_identical_to_base(base_dir):
    model = load_base(base_dir).eval()
    idx = tokens()
    with torch.no_grad():
        before = model(idx)
        apply_lora(model)
        after = model(idx)
    assert len(lora_layers(model)) == 7 * LLAMA["n_layer"]
    assert torch.equal(before, after)


def test_merged_model_forward_equals_unmerged(base_dir):
    model = load_base(base_dir)
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
        for _, m in lora_layers(model):
            m.unmerge()
        base = load_base(base_dir).eval()(idx)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    for name, m in lora_layers(model):
        torch.testing.assert_close(m.base.weight, originals[f"{name}.weight"], rtol=0, atol=1e-6)


def test_optimizer_step_changes_only_lora_parameters(base_dir):
    model = load_base(base_dir)
    apply_lora(model, dropout=0.1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Every parameter goes to the optimizer on purpose: freezing alone must keep the base model fixed.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    idx = tokens()
    for _ in range(2):  # two steps: at the first, A's gradient is zero (B = 0)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert "transformer.h.0.attn.k_proj.lora_B" in before and "transformer.h.0.ln_1.weight" in before
    for k in before:
        if "lora" in k:
            assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed but is frozen"


# -----------------------------------------------------------------------------
# Adapters in PEFT's LlamaForCausalLM layout


def test_hf_module_name_maps_llama_names_and_keeps_gpt2s():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert hf_module_name(llama, "transformer.h.1.attn.q_proj") == "model.layers.1.self_attn.q_proj"
    assert hf_module_name(llama, "transformer.h.0.mlp.down_proj") == "model.layers.0.mlp.down_proj"
    assert hf_module_name(gpt2, "transformer.h.1.attn.c_attn") == "transformer.h.1.attn.c_attn"


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_llama()
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    randomize_lora(model)
    save_adapter(model, tmp_path, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = read_adapter_config(tmp_path)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["target_modules"] == sorted(LLAMA_TARGETS)
    assert config["fan_in_fan_out"] is False  # Llama's layers are nn.Linear (GPT-2's Conv1D say True)
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"

    shapes = {k: tuple(v.shape) for k, v in load_safetensors(tmp_path / "adapter_model.safetensors").items()}
    C, kv, F, r = LLAMA["n_embd"], 32, LLAMA["intermediate_size"], 4
    assert len(shapes) == 2 * 7 * LLAMA["n_layer"]
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (r, C)
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (kv, r)  # GQA: narrow
    assert shapes["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"] == (F, r)
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] == (r, F)

    fresh = tiny_llama()  # same seed: the same base weights
    summary = load_adapter(fresh, tmp_path)
    assert summary.layers == [n for n, _ in lora_layers(model)]
    ours, theirs = lora_state_dict(model), lora_state_dict(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens()), fresh(tokens()))


def test_partial_targets_are_saved_by_hugging_face_full_name(tmp_path):
    model = tiny_llama()
    apply_lora(model, rank=2, targets=r"transformer\.h\.1\.attn\.o_proj")
    randomize_lora(model)
    save_adapter(model, tmp_path)
    assert read_adapter_config(tmp_path)["target_modules"] == ["model.layers.1.self_attn.o_proj"]
    fresh = tiny_llama()
    assert load_adapter(fresh, tmp_path).layers == ["transformer.h.1.attn.o_proj"]
    assert torch.equal(fresh.transformer.h[1].attn.o_proj.lora_B, model.transformer.h[1].attn.o_proj.lora_B)


def test_our_adapter_file_matches_what_peft_writes(base_dir, tmp_path):
    """Same rank, alpha and targets: PEFT's own save_pretrained on the transformers model writes the same keys,
    shapes and config values as save_adapter does on ours."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LLAMA_TARGETS),
                             task_type="CAUSAL_LM")
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir), config).save_pretrained(
        tmp_path / "peft")
    model = load_base(base_dir)
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    save_adapter(model, tmp_path / "ours", base_model_name_or_path=base_dir)

    def shapes(d):
        return {k: tuple(v.shape) for k, v in load_safetensors(d / "adapter_model.safetensors").items()}

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours = read_adapter_config(tmp_path / "ours")
    assert sorted(theirs["target_modules"]) == ours["target_modules"]
    for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
              "use_dora", "modules_to_save", "init_lora_weights", "inference_mode"):
        assert ours[k] == theirs[k], k


@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj"), r"transformer\.h\.1\.(attn\.k_proj|mlp\.up_proj)"],
                         ids=["default", "q_v", "regex"])
def test_peft_loads_our_adapter_with_equal_logits(base_dir, tmp_path, targets):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = load_base(base_dir)
    summary = apply_lora(model, rank=4, alpha=8, targets=targets)
    randomize_lora(model)  # non-zero B: the adapter really changes the logits
    model.eval()
    save_adapter(model, tmp_path, base_model_name_or_path=base_dir)
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    idx = tokens()
    base_logits = hf_logits(base, idx)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].fan_in_fan_out is False
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer))
    assert wrapped == sorted(hf_module_name(model, n) for n in summary.layers)  # exactly the layers we adapted
    with torch.no_grad():
        ours = model(idx)
    assert (ours - base_logits).abs().max() > 1e-2  # the comparison below is not trivially true
    torch.testing.assert_close(hf_logits(peft_model, idx), ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("target_modules", [list(LLAMA_TARGETS), r".*\.layers\.1\.self_attn\.(q|v)_proj"],
                         ids=["all", "regex"])
def test_peft_saved_adapter_loads_into_ours_with_equal_logits(base_dir, tmp_path, target_modules):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=target_modules,
                             bias="none", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(base, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(tmp_path)
    idx = tokens()
    expected = hf_logits(peft_model, idx)

    model = load_base(base_dir)
    summary = load_adapter(model, tmp_path)
    want = (LLAMA_TARGETS if isinstance(target_modules, list) else ("q_proj", "v_proj"))
    assert len(summary.layers) == len(want) * (LLAMA["n_layer"] if isinstance(target_modules, list) else 1)
    assert {m.scaling for _, m in lora_layers(model)} == {16 / 4}
    model.eval()
    with torch.no_grad():
        assert (model(idx) - load_base(base_dir).eval()(idx)).abs().max() > 1e-2
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-4)


def test_merged_export_opens_in_transformers(base_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = load_base(base_dir)
    plain_keys = list(model.state_dict())
    apply_lora(model)
    randomize_lora(model)
    model.eval()
    merged = merge_lora(model)
    assert type(merged) is GPT and not lora_layers(merged)
    assert list(merged.state_dict()) == plain_keys  # the plain Llama names again
    assert merged.lm_head.weight is merged.transformer.wte.weight
    save_pretrained(merged, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    idx = tokens()
    with torch.no_grad():
        ours = model(idx)
        assert (ours - load_base(base_dir).eval()(idx)).abs().max() > 1e-2
    torch.testing.assert_close(hf_logits(hf, idx), ours, rtol=0, atol=1e-4)


# -----------------------------------------------------------------------------
# Refusals: an adapter belongs to its base model


def test_adapters_refuse_the_other_architecture(tmp_path):
    gpt2, llama = tiny_gpt2(), tiny_llama()
    apply_lora(gpt2)
    save_adapter(gpt2, tmp_path / "gpt2")
    apply_lora(llama)
    save_adapter(llama, tmp_path / "llama")
    for adapter, model, made_for, arch in ((tmp_path / "gpt2", tiny_llama(), "gpt2", "llama"),
                                           (tmp_path / "llama", tiny_gpt2(), "llama", "gpt2")):
        with pytest.raises(ValueError) as e:
            load_adapter(model, adapter)
        message = str(e.value)
        assert "\n" not in message and message.startswith(str(adapter / "adapter_model.safetensors"))
        assert f"made for a {made_for} model" in message and f"the model is a {arch} model" in message
        assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_llama_adapter_refuses_other_llama_shapes(tmp_path):
    model = tiny_llama()
    apply_lora(model, rank=4)
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"k_proj.lora_B.weight has shape \(32, 4\), expected \(64, 4\)"):
        load_adapter(tiny_llama(n_kv_head=4), tmp_path)  # multi-head attention: k and v are as wide as q
    with pytest.raises(ValueError, match="missing"):
        load_adapter(tiny_llama(n_layer=3), tmp_path)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(tiny_llama(n_layer=1), tmp_path)


# -----------------------------------------------------------------------------
# Size on the real SmolLM2-135M shape


def test_smollm2_rank8_adapter_is_under_2_percent_of_the_model(tmp_path):
    config = PRESETS["smollm2-135m"]
    with torch.device("meta"):  # SmolLM2's shapes without initialising 135M weights
        model = GPT(config)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # fp32, tied head counted once
    model.to_empty(device="cpu")  # memory for the weights, never written: only the LoRA tensors are used
    summary = apply_lora(model, rank=8)
    save_adapter(model, tmp_path)
    adapter_bytes = os.path.getsize(tmp_path / "adapter_model.safetensors")
    C, kv, F, L, r = config.n_embd, config.kv_heads * config.head_size, config.mlp_width, config.n_layer, 8
    assert (C, kv, F, L) == (576, 192, 1536, 30)
    assert summary.trainable == L * r * (2 * C + 2 * (C + kv) + 2 * C + 2 * (C + F) + (F + C)) == 2_442_240
    assert 4 * summary.trainable < adapter_bytes < 4 * summary.trainable + 64 * 1024  # fp32 + a header
    assert adapter_bytes < 0.02 * base_bytes, f"{adapter_bytes / base_bytes:.2%}"
