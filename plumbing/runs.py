"""plumbing/runs.py: what train.py left in its --out directory, found again: run.json, adapter/ or model/.

eval.py evaluates "the run in out/" by default; this file locates its pieces and says what is missing.
"""

import json
import os

from plumbing.peft_format import ADAPTER_CONFIG


def read_run(out_dir):
    """train.py's run.json as a dict ({} if there is none): "args" holds the run's TrainConfig (model, data,
    train_on, max_len, overflow...), next to "wall_time_s", "status", "trainable_params" and more."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run train.py or pass --model/--data") from None


def locate_tuned(cfg):
    """(directory, kind) of the model to evaluate: kind "lora" for an adapter dir, "full" for a model dir."""
    d = cfg.adapter
    if d is None:
        candidates = [os.path.join(cfg.out, name) for name in ("adapter", "model")]
        d = next((c for c in candidates if os.path.isdir(c)), None)
        if d is None:
            raise FileNotFoundError(f"{cfg.out}: neither {cfg.out}/adapter nor {cfg.out}/model exists; run "
                                    "train.py first, or pass --adapter DIR (and --out where train.py wrote)")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"--adapter {d}: no such directory")
    if os.path.isfile(os.path.join(d, ADAPTER_CONFIG)):
        return d, "lora"
    if os.path.isfile(os.path.join(d, "config.json")):
        return d, "full"
    raise FileNotFoundError(f"{d}: neither a LoRA adapter ({ADAPTER_CONFIG}) nor a model directory "
                            "(config.json + model.safetensors)")
