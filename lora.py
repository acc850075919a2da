"""lora.py: LoRA by hand: low-rank adapters for GPT's Linear layers (GPT-2 or Llama/SmolLM2), merged
or not, saved as PEFT adapters.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes every pretrained weight W (out, in) and learns a
low-rank update instead: y = W x + (alpha / r) * B A x, with A (r, in) and B (out, r), r in the
single digits, so a fine-tune trains and stores ~1% of the parameters. Because BA has W's shape, the
update can be folded into W for serving (merge) and taken out again (unmerge), and the adapter alone
is a file of a few megabytes that Hugging Face PEFT opens on top of the original model
(GPT2LMHeadModel or LlamaForCausalLM).

There is no CLI: train.py uses it for LoRA fine-tuning, and `python -m pytest tests/test_lora.py
tests/test_lora_llama.py` checks it against PEFT and transformers. The adapter files' format lives
in plumbing/peft_format.py. In code:

    report = apply_lora(model, rank=8, alpha=16)     # wrap DEFAULT_TARGETS[arch], freeze the rest; print(report)
    ...train lora_parameters(model)...
    save_adapter(model, "out/adapter", base_model_name_or_path="gpt2")
    load_adapter(from_pretrained("gpt2"), "out/adapter")         # ours or PEFT's adapter
    save_pretrained(merge_lora(model), "out/merged")             # a plain GPT, opens in transformers
"""

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from plumbing.hf_format import check_shapes, hf_name
from plumbing.peft_format import (check_architecture, is_target, peft_key, read_adapter_config, read_adapter_weights,
                                  target_modules, write_adapter)

# The Linear layers apply_lora wraps when given no targets: every projection of every block,
# attention and MLP alike (lm_head never: see _target_linears). Footgun: PEFT's own default for
# Llama, a LoraConfig without target_modules, adapts only q_proj and v_proj: under a quarter of the
# LoRA parameters these seven get (tested).
DEFAULT_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # "c_proj" is both attn.c_proj and mlp.c_proj
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


# -----------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = base(x) +
    dropout(x) @ A.T @ B.T * alpha / rank.

    Composition, not inheritance: the pretrained layer lives on untouched as `self.base`, so its
    weight shows up as `...c_attn.base.weight` and every LoRA tensor's name contains "lora".
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.base = base
        self.base.requires_grad_(False)  # the pretrained weight (and bias) never change
        self.rank = rank
        self.alpha = alpha
        # Section 4.1 of the paper scales the update by alpha / r, so with alpha fixed a larger r
        # does not mean a larger update at init and a retuned learning rate ("we simply set alpha to
        # the first r we try and do not tune it").
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=w.device, dtype=w.dtype))
        # Dropout on the LoRA branch's input only (train mode only, as any nn.Dropout): the frozen
        # path sees x as it is, so the pretrained model's behaviour is not perturbed.
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False  # True while B A * scaling is folded into base.weight
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self):
        # B = 0 makes the update B A zero at the start, so training begins exactly at the pretrained
        # model (Section 4.1). A must then be random: were both zero, neither would ever get a
        # gradient. The paper says "random Gaussian" for A; its reference code (loralib) and PEFT
        # use nn.Linear's default init, kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in),
        # 1/sqrt(in)). We follow the code. Consequence: at the first step A's gradient is exactly
        # zero (it is multiplied by B = 0); only B moves, and A starts moving from the second step.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self):
        """The update in W's layout (out, in): B @ A * scaling."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def update(self, x):
        """The low-rank branch: dropout(x) @ A.T @ B.T * alpha / rank, (..., in) -> (..., out).
        Left to right: (x @ A.T) is (..., r), then (..., out). Computing B @ A first would build the
        full (out, in) matrix on every call, the cost LoRA avoids. The scale is applied to the narrow
        (..., r) activations rather than the wide (..., out) result: the same product, r/out as many
        multiplies."""
        return (self.lora_dropout(x) @ self.lora_A.T * self.scaling) @ self.lora_B.T

    def forward(self, x):
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # one low-precision copy of x for both paths, the copy a full fine-tune's matmul keeps
            x = x.to(torch.get_autocast_dtype(device))
        y = self.base(x)
        # base.weight already holds the update. Footgun: A and B then get no gradient.
        if self.merged:
            return y
        if not (torch.is_grad_enabled() and self.lora_A.requires_grad):
            return y + self.update(x)
        # Training: the branch's inner tensors (dropout's mask and its copy of x, the (..., r)
        # product) are recomputed in backward instead of kept, from x alone, with dropout's random
        # state replayed. The frozen W needs no x for a gradient, so LoRA then keeps no more per
        # token than a full fine-tune does (tested), at the price of the small branch run twice.
        return y + checkpoint(self.update, x, use_reentrant=False)

    @torch.no_grad()
    def merge(self):
        """Fold the update into the frozen weight: W <- W + B A * scaling (Section 4.1, "No
        Additional Inference Latency"). Idempotent. Unlike loralib, .eval() never merges:
        merging is always explicit."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the update out again: W <- W - B A * scaling. Idempotent. Exact up to float
        rounding in fp32; in bf16/fp16 weights the round trip loses low bits, so keep the
        weights fp32 if you unmerge."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# -----------------------------------------------------------------------------
# Wrapping a model


@dataclass
class LoRASummary:
    """What apply_lora did; str() gives a one-line report for scripts to print."""

    trainable: int  # parameters that will receive gradients: the LoRA A and B matrices
    total: int  # all parameters of the model, LoRA included, the tied wte/lm_head counted once
    layers: list = field(default_factory=list)  # names of the wrapped Linear layers

    @property
    def percent(self):
        return 100.0 * self.trainable / self.total

    def __str__(self):
        return (f"LoRA on {len(self.layers)} Linear layers: {self.trainable:,} trainable of {self.total:,} "
                f"parameters ({self.percent:.2f}%)")


def default_targets(model):
    """The targets apply_lora uses when given none: DEFAULT_TARGETS for the model's architecture."""
    return DEFAULT_TARGETS[model.config.arch]


def hf_module_name(model, name):
    """Our module name -> the Hugging Face model's (the namespace of
    PEFT's keys and target_modules)."""
    return hf_name(model.config.arch, name)


def lora_layers(model):
    """[(name, LoRALinear)] of a model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _target_linears(model, targets, hf_names=False):
    """[(name, nn.Linear)] that apply_lora would wrap; refuses a model that already has LoRA layers,
    a target that names something other than a Linear layer, and targets that match nothing. targets
    name our modules, or with hf_names=True the Hugging Face model's (as an adapter_config.json
    does); names returned are ours."""
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers; apply LoRA (or load an adapter) to a fresh model")
    found = []
    for name, module in model.named_modules():
        if not is_target(hf_module_name(model, name) if hf_names else name, targets):
            continue
        # tied to wte in GPT-2 and SmolLM2: merging into it would change the embedding too
        if name == "lm_head":
            raise ValueError("LoRA targets include lm_head; lora.py adapts only the transformer blocks' Linear "
                             "layers (the head is tied to the token embedding in GPT-2 and SmolLM2)")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {name} is a {type(module).__name__}, not an nn.Linear layer")
        found.append((name, module))
    if not found:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and n != "lm_head"})
        raise ValueError(f"no Linear layer of the model matches the LoRA targets {targets!r} (this "
                         f"{model.config.arch} model's are {', '.join(linears)})")
    return found


def apply_lora(model, rank=8, alpha=16, dropout=0.0, targets=None):
    """Wrap every Linear layer named by targets (see is_target; None: default_targets(model)) in a
    LoRALinear, in place, and freeze every other parameter (the tied wte/lm_head included). Returns
    a LoRASummary; prints nothing."""
    if targets is None:
        targets = default_targets(model)
    found = _target_linears(model, targets)
    model.requires_grad_(False)
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linear, rank, alpha, dropout))
    return LoRASummary(trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       total=sum(p.numel() for p in model.parameters()),
                       layers=[name for name, _ in found])


def lora_parameters(model):
    """The trainable tensors, for the optimizer: every LoRA layer's A and B."""
    return [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model):
    """{name: tensor} of the LoRA weights only (e.g. transformer.h.0.attn.c_attn.lora_A)."""
    return {f"{name}.{t}": getattr(m, t).detach() for name, m in lora_layers(model) for t in ("lora_A", "lora_B")}


def load_lora_state_dict(model, sd, source="LoRA state dict"):
    """Copy {name: tensor} (as from lora_state_dict) into a model that already has its LoRA layers,
    after checking that the keys and shapes are exactly the model's."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{source}: the model has no LoRA layers; call apply_lora first")
    if any(m.merged for _, m in layers):
        raise ValueError(f"{source}: LoRA layers are merged; unmerge them before loading new weights")
    ours = lora_state_dict(model)
    check_shapes({k: v.shape for k, v in ours.items()}, sd, source, "LoRA weights made for a different base "
                 "model, targets or rank?")
    with torch.no_grad():
        for k, p in ours.items():
            p.copy_(sd[k])


# -----------------------------------------------------------------------------
# Export: fold the adapters in and give back a plain GPT


def merge_lora(model):
    """A deep copy of model with every LoRA update folded into its weight and each LoRALinear
    replaced by the plain nn.Linear it wrapped: a GPT with the original module names (so
    model.save_pretrained writes the family's own Hugging Face keys, GPT-2's or Llama's) and all
    parameters trainable again. The LoRA model itself is left as it was."""
    merged = copy.deepcopy(model)  # deepcopy keeps wte and lm_head tied (one tensor, copied once)
    for name, layer in lora_layers(merged):
        layer.merge()  # no-op if it already was
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.base)
    merged.requires_grad_(True)
    return merged


# -----------------------------------------------------------------------------
# Adapter files in Hugging Face PEFT's format (plumbing/peft_format.py reads and writes them)


def _peft_key(model, name, tensor):
    """The key PEFT saves LoRA tensor "lora_A" or "lora_B" of our layer `name` under."""
    return peft_key(hf_module_name(model, name), tensor)


def save_adapter(model, out_dir, base_model_name_or_path=None):
    """Write the LoRA weights alone as a PEFT adapter: adapter_config.json +
    adapter_model.safetensors, so PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base),
    out_dir) opens it (LlamaForCausalLM for a Llama). PEFT stores A (r, in) and B (out, r) in
    nn.Linear's orientation even for GPT-2's Conv1D layers: no transpose here, only the module names
    change to the Hugging Face model's (hf_module_name)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: nothing to save as an adapter")
    settings = {(m.rank, m.alpha, m.lora_dropout.p) for _, m in layers}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers differ in (rank, alpha, dropout) {sorted(settings)}; an adapter "
                         "config records one setting")
    (rank, alpha, dropout), = settings
    tensors = {_peft_key(model, name, t): getattr(m, t).detach() for name, m in layers for t in ("lora_A", "lora_B")}
    candidates = [hf_module_name(model, n) for n, m in model.named_modules()
                  if n != "lm_head" and isinstance(m, (nn.Linear, LoRALinear))]
    targets = target_modules([hf_module_name(model, name) for name, _ in layers], candidates)
    write_adapter(out_dir, tensors, rank, alpha, dropout, targets, model.config.arch, base_model_name_or_path)


def load_adapter(model, adapter_dir):
    """Apply LoRA to model as the adapter's config says (rank, alpha, dropout, target_modules,
    matched against the Hugging Face model's module names as PEFT does) and load its weights; works
    for adapters written by save_adapter or by PEFT. Every key and shape is checked before the model
    is touched: an adapter for another base model (another architecture, size or depth) raises
    ValueError. Returns apply_lora's summary."""
    config = read_adapter_config(adapter_dir)
    targets = config["target_modules"]
    targets = targets if isinstance(targets, str) else tuple(targets)
    rank = config["r"]
    sd, path = read_adapter_weights(adapter_dir)
    check_architecture(model.config.arch, sd, path)
    found = _target_linears(model, targets, hf_names=True)
    expected = {}  # PEFT key -> shape
    for name, linear in found:
        expected[_peft_key(model, name, "lora_A")] = (rank, linear.in_features)
        expected[_peft_key(model, name, "lora_B")] = (linear.out_features, rank)
    check_shapes(expected, sd, path, "LoRA weights made for a different base model, targets or rank?")
    # The layers found, by their full names (ours): apply_lora wraps exactly these.
    summary = apply_lora(model, rank=rank, alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
                         targets=tuple(name for name, _ in found))
    load_lora_state_dict(model, {f"{name}.{t}": sd[_peft_key(model, name, t)] for name, _ in found
                                 for t in ("lora_A", "lora_B")}, source=path)
    return summary
