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
import math
import os
import re

from plumbing.files import atomic_write_text, read_json
from plumbing.safetensors_io import load_safetensors, save_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_SUFFIX = ".weight"
# Where the blocks' keys start in each architecture's adapter: how an adapter tells a GPT-2 one from a Llama one.
PEFT_BLOCKS = {"gpt2": PEFT_PREFIX + "transformer.h.", "llama": PEFT_PREFIX + "model.layers."}


def check_target_regex(pattern, source):
    """Refuse a target_modules regular expression that could take exponential time to match: Python's
    re backtracks, and a repeated group such as (.|.)* stalls on every module name. A repeat may apply
    to one character, a character class or `.` only, at most 4 of them (PEFT's own patterns, like
    .*\\.(q_proj|v_proj), are of this kind)."""
    try:  # the standard library's parser of patterns, to inspect the structure
        import re._parser as sre
    except ImportError:  # Python 3.10
        import sre_parse as sre

    repeats = (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT))
    count = [0]  # repeats seen: k of them in a row backtrack like n^k

    def walk(items, inside_repeat):
        for op, arg in items:
            if op in repeats:
                lo, hi, sub = arg
                simple = len(sub) == 1 and sub[0][0] in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)
                if hi != 1 and (inside_repeat or not simple):
                    raise ValueError(f"{source}: target_modules {pattern!r} repeats a group; handtune "
                                     "matches only patterns whose repeats are single characters or "
                                     "classes (list the module names instead)")
                count[0] += hi != 1
                if count[0] > 4:
                    raise ValueError(f"{source}: target_modules {pattern!r} has more than 4 repeats; "
                                     "list the module names instead")
                walk(sub, inside_repeat or hi != 1)
            elif op is sre.SUBPATTERN:
                walk(arg[-1], inside_repeat)
            elif op is sre.BRANCH:
                for branch in arg[1]:
                    walk(branch, inside_repeat)

    if len(pattern) > 1000:
        raise ValueError(f"{source}: target_modules is a {len(pattern)}-character pattern; at most 1000")
    try:
        walk(sre.parse(pattern), False)
    except re.error as e:
        raise ValueError(f"{source}: target_modules {pattern!r} is not a regular expression ({e})") from None


def check_lora_numbers(config, source):
    """r a positive integer, lora_alpha a finite positive number, lora_dropout in [0, 1), target_modules
    a non-empty list of module names or a regular expression that matches in bounded time."""
    r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout") or 0.0
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ValueError(f"{source}: r={r!r}; the rank must be a positive integer")
    if not (number(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{source}: lora_alpha={alpha!r}; it must be a finite positive number")
    if not (number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"{source}: lora_dropout={dropout!r}; it must be in [0, 1)")
    targets = config["target_modules"]
    if isinstance(targets, str):
        check_target_regex(targets, source)
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"{source}: target_modules must be a list of module names or one regular "
                         f"expression, got {str(targets)[:80]}")


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
    config = read_json(path)  # one line for a malformed, huge or deeply nested file
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
    check_lora_numbers(config, path)
    return config


def read_adapter_weights(adapter_dir):
    """(adapter_model.safetensors as {PEFT key: tensor}, its path)."""
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} here (only {ADAPTER_CONFIG})")
    return load_safetensors(path), path
