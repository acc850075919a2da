"""plumbing/peft_format.py: LoRA adapters on disk in Hugging Face PEFT's format, so PEFT opens ours and we
open PEFT's.

An adapter directory holds adapter_config.json (rank, alpha, targets, ...) and adapter_model.safetensors (A
and B of every adapted layer). PEFT saves a tensor under PEFT_PREFIX + the module's name in the Hugging Face
model + ".lora_A.weight": GPT2LMHeadModel's module names are ours, so `transformer.h.0.attn.c_attn.lora_A`
is saved as `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`; LlamaForCausalLM's differ, so
`transformer.h.0.attn.q_proj.lora_A` is saved as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
lora.py maps the names; this file reads and writes the two files.
"""

import json
import os
import re

from plumbing.files import atomic_write_text
from plumbing.safetensors_io import load_safetensors, save_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_SUFFIX = ".weight"
# Where the blocks' keys start in each architecture's adapter: how an adapter tells a GPT-2 one from a Llama one.
PEFT_BLOCKS = {"gpt2": PEFT_PREFIX + "transformer.h.", "llama": PEFT_PREFIX + "model.layers."}


def is_target(name, targets):
    """PEFT's matching rule: a list of names matches a module whose name equals one or ends with '.' + one
    (so "c_proj" is both attn.c_proj and mlp.c_proj); a single string is a regex the whole name must match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_modules(wrapped, candidates):
    """What adapter_config.json's target_modules should say, given the Hugging Face names of the wrapped layers
    and of every layer that could have been: their short names ("c_attn", "q_proj", ...) when those select
    exactly the wrapped layers (the usual case), else every wrapped layer's full name."""
    short = sorted({name.rpartition(".")[2] for name in wrapped})
    selected = [n for n in candidates if is_target(n, short)]
    return short if sorted(selected) == sorted(wrapped) else list(wrapped)


def peft_key(hf_name, tensor):
    """The key PEFT saves LoRA tensor "lora_A" or "lora_B" of the Hugging Face module hf_name under."""
    return f"{PEFT_PREFIX}{hf_name}.{tensor}{PEFT_SUFFIX}"


def check_architecture(arch, keys, source):
    """Refuse an adapter whose keys are another architecture's (a GPT-2 adapter on a Llama, or the reverse)
    before its target names get the chance to fail with a less telling message."""
    for other, prefix in PEFT_BLOCKS.items():
        if other != arch and any(k.startswith(prefix) for k in keys):
            raise ValueError(f"{source}: this adapter was made for a {other} model (its keys start with "
                             f"{prefix}) but the model is a {arch} model; load it onto the base model it was "
                             "trained from")


def write_adapter(out_dir, tensors, rank, alpha, dropout, target_modules, arch, base_model_name_or_path):
    """Write {PEFT key: tensor} and the matching adapter_config.json into out_dir."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",  # PeftModel.from_pretrained then builds a PeftModelForCausalLM
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        # GPT-2's checkpoint stores these layers as Conv1D, weight (in, out): PEFT needs to know when it
        # merges. It does not change the orientation of the saved A and B. Llama's are nn.Linear, (out, in).
        "fan_in_fan_out": arch == "gpt2",
        "bias": "none",  # biases stay frozen and are not part of the adapter
        "use_rslora": False,  # scaling is alpha / r, not alpha / sqrt(r)
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    atomic_write_text(os.path.join(out_dir, ADAPTER_CONFIG), json.dumps(config, indent=2) + "\n")


def read_adapter_config(adapter_dir):
    """adapter_config.json as a dict, refusing adapters of a kind this file does not implement."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG} here; an adapter directory holds "
                                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (as save_adapter or PEFT write them)")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters load here")
    for k in ("r", "lora_alpha", "target_modules"):
        if config.get(k) is None:
            raise ValueError(f"{path}: no {k!r} field; is this a LoRA adapter_config.json?")
    # Variants that change the math or the stored tensors: refuse them rather than load them wrongly.
    unsupported = {"use_dora": False, "use_rslora": False, "lora_bias": False, "bias": "none",
                   "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                   "modules_to_save": None, "layer_replication": None, "target_parameters": None}
    for k, plain in unsupported.items():
        if config.get(k) not in (plain, None, [], {}):
            raise ValueError(f"{path}: {k}={config[k]!r} is not supported by lora.py (plain LoRA only)")
    return config


def read_adapter_weights(adapter_dir):
    """(adapter_model.safetensors as {PEFT key: tensor}, its path)."""
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} here (only {ADAPTER_CONFIG})")
    return load_safetensors(path), path
