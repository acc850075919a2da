"""plumbing/runs.py: what train.py left in its --out directory, found again: run.json, adapter/ or model/.

eval.py evaluates "the run in out/" by default; this file locates its pieces and says what is missing.
train.py clears what a killed write left in it (remove_stray_temps). remembered() keeps a deterministic
result (the base model's greedy replies) for the next run that would compute it again.
"""

import hashlib
import json
import math
import os
import re
import time

from plumbing.files import atomic_write_text, read_json, remove
from plumbing.peft_format import ADAPTER_CONFIG


def read_run(out_dir):
    """train.py's run.json as a dict ({} if there is none): "args" holds the run's TrainConfig (model, data,
    train_on, max_len, overflow...), next to "wall_time_s", "status", "trainable_params" and more."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.isfile(path):
        return {}
    return read_json(path)


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


def remembered(directory, key, compute):
    """compute(), or the value it returned before for the same key (any JSON value: what the result depends
    on), kept in directory as one JSON file per key. For deterministic work repeated across runs; directory
    None remembers nothing."""
    if directory is None:
        return compute()
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(directory, name + ".json")
    if os.path.isfile(path):
        return read_json(path)["value"]
    value = compute()
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "value": value}) + "\n")
    return value


# plumbing/files.atomic_write's temporary files and save_checkpoint's temporary directories are named
# NAME.<8 random characters>.tmp (tempfile's mkstemp/mkdtemp); a kill before their rename leaves them behind.
TEMP_NAME = re.compile(r".+\.[a-z0-9_]{8}\.tmp")


def remove_stray_temps(out_dir, log=print):
    """Delete the temporary files and directories interrupted writes left in a run's folders (out/, adapter/,
    model/, ckpt/), so they are never taken for outputs; the first process only. Returns their paths."""
    if int(os.environ.get("RANK", "0")) != 0:
        return []
    removed = []
    for d in (out_dir, *(os.path.join(out_dir, sub) for sub in ("adapter", "model", "ckpt"))):
        for entry in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            path = os.path.join(d, entry)
            if TEMP_NAME.fullmatch(entry):
                remove(path)
                removed.append(path)
    if removed:
        log(f"removed {len(removed)} temporary file(s) an interrupted write left: {', '.join(removed)}")
    return removed


# -----------------------------------------------------------------------------
# What train.py writes as it goes: run.json, metrics.jsonl


def write_run_json(out_dir, master, info, status, step, t_start):
    """run.json: the run's settings and outcome (rank 0 only), rewritten atomically at every status change."""
    if master:
        os.makedirs(out_dir, exist_ok=True)
        info = dict(info, status=status, steps=step, wall_time_s=round(time.time() - t_start, 2))
        atomic_write_text(os.path.join(out_dir, "run.json"), json.dumps(info, indent=2) + "\n")


def keep_metrics(path, step):
    """Rewrite metrics.jsonl with only the records up to step (0: an empty log for a new run)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_metrics(path, record):
    """Add one record to metrics.jsonl. Appended, not rewritten atomically: a crash loses at most the
    line being written, and a resumed run rewrites the file (keep_metrics) before appending again.
    A non-finite number is written as null, so every line stays valid JSON."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")
