"""plumbing/checkpoint.py: training checkpoints that survive a kill at any moment, and the state they carry.

A checkpoint is a directory ckpt/step_NNNNNNN holding tensors.safetensors (weights, optimizer moments,
random generator states) and state.json (everything else, written last, with the size and sha256 of
tensors.safetensors); ckpt/latest names the newest complete one. Loading runs no code (safetensors + JSON,
never pickle). Resuming heals: `latest` is only a hint, every checkpoint is verified against its state, and the
newest one that verifies is used (a damaged newer one is said, in one line, and removed). save_run_checkpoint/
restore hold a training run's state: trainable weights, optimizer, gradient scaler, data position, every
process's random generators.
"""

import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from plumbing.files import atomic_write_text, creation_mode, file_digest, fsync_dir, read_json, remove
from plumbing.safetensors_io import load_safetensors, save_safetensors

LATEST = "latest"  # ckpt/latest names the newest complete checkpoint directory
CHECKPOINT_FILES = ("tensors.safetensors",)  # the files a state.json may name (with size and sha256)
# What resuming reads from state.json: a file without one of these is not a checkpoint of ours.
STATE_KEYS = ("step", "best_val", "bad_evals", "data", "args", "world_size", "optimizer", "scaler", "rng")
CHECKPOINT_NAME = re.compile(r"step_\d{7}")


def save_checkpoint(ckpt_dir, step, tensors, state):
    """Write tensors (safetensors) and state (JSON) as ckpt_dir/step_NNNNNNN, atomically, and point
    ckpt_dir/latest at it; keep the previous checkpoint, delete older ones.

    Atomic in three stages: (1) both files are written to a fresh temporary directory (each fsynced), (2) that
    directory is renamed to its final name, (3) `latest` is replaced (tmp file + fsync + rename) to name it.
    A kill before (3) leaves `latest` naming the previous complete checkpoint; readers never follow
    `latest` into a half-written directory."""
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(ckpt_dir, name)
    if read_latest(ckpt_dir) == name:
        return final  # this step is already saved (e.g. Ctrl-C right after a periodic save)
    tmp = tempfile.mkdtemp(dir=ckpt_dir, prefix=f".{name}.", suffix=".tmp")
    os.chmod(tmp, creation_mode(0o777))  # mkdtemp makes it private; a checkpoint is an ordinary directory
    try:
        save_safetensors(tensors, os.path.join(tmp, "tensors.safetensors"))
        files = {"tensors.safetensors": file_digest(os.path.join(tmp, "tensors.safetensors"))}
        atomic_write_text(os.path.join(tmp, "state.json"), json.dumps({**state, "files": files}) + "\n")
        if os.path.isdir(final):  # left over from a run that crashed after (2): not referenced by latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        atomic_write_text(os.path.join(ckpt_dir, LATEST), name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # prune: everything but the new checkpoint and the one before it (a damaged one of a later step, from
    # before a resume that skipped it, goes too)
    previous = next((c for c in checkpoint_names(ckpt_dir) if c < name), None)
    for entry in os.listdir(ckpt_dir):
        if entry not in (LATEST, name, previous):
            remove(os.path.join(ckpt_dir, entry))
    return final


def read_latest(ckpt_dir):
    """The checkpoint directory ckpt_dir/latest names, or None if it is missing, empty, garbage or names no
    directory: it is a hint (load_checkpoint verifies and falls back), never trusted blindly."""
    try:
        with open(os.path.join(ckpt_dir, LATEST), "rb") as f:
            name = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if CHECKPOINT_NAME.fullmatch(name) and os.path.isdir(os.path.join(ckpt_dir, name)) else None


def checkpoint_names(ckpt_dir):
    """The step_NNNNNNN directories in ckpt_dir, newest (highest step) first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted((e for e in os.listdir(ckpt_dir) if CHECKPOINT_NAME.fullmatch(e)
                   and os.path.isdir(os.path.join(ckpt_dir, e))), reverse=True)


def verified(path):
    """(tensors, state) of the checkpoint directory path, after checking that state.json parses and that
    tensors.safetensors has the size and sha256 state.json recorded. Raises ValueError naming the file."""
    state_path = os.path.join(path, "state.json")
    try:
        state = read_json(state_path)
    except FileNotFoundError:
        raise ValueError(f"{state_path} is missing") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{state_path} is damaged or cut short ({e})") from None
    files = state.get("files", {})
    if not isinstance(files, dict):
        raise ValueError(f"{state_path}: 'files' is not an object")
    for name, want in files.items():
        # only plain files of this checkpoint: a name like ../../etc/hostname is never read
        if name not in CHECKPOINT_FILES or not (isinstance(want, dict) and {"bytes", "sha256"} <= set(want)):
            raise ValueError(f"{state_path} names {name!r}, not a file of a checkpoint")
        file_path = os.path.join(path, name)
        got = file_digest(file_path) if os.path.isfile(file_path) else None
        if got != want:
            why = "is missing" if got is None else (f"has {got['bytes']:,} bytes, {want['bytes']:,} were written"
                                                   if got["bytes"] != want["bytes"] else "has changed (sha256)")
            raise ValueError(f"{file_path} {why}")
    try:
        tensors = load_safetensors(os.path.join(path, "tensors.safetensors"))
    except (OSError, ValueError) as e:  # a checkpoint from before the checksums, damaged
        raise ValueError(f"{os.path.join(path, 'tensors.safetensors')}: {e}") from None
    return tensors, state


def load_checkpoint(ckpt_dir):
    """(tensors, state) of the newest checkpoint in ckpt_dir that verifies; state["loaded_from"] is its path.
    Each damaged newer one is said in one line (stderr, first process) and removed, and `latest` is pointed
    at the one loaded, so the resumed run saves and prunes as if nothing had happened. Loading runs no code."""
    first = int(os.environ.get("RANK", "0")) == 0
    latest = os.path.join(ckpt_dir, LATEST)
    if first and os.path.isfile(latest) and read_latest(ckpt_dir) is None:
        print(f"ignoring {latest}: it names no checkpoint directory (damaged); using the newest that verifies",
              file=sys.stderr)
    problems, names = [], checkpoint_names(ckpt_dir)
    for k, name in enumerate(names):
        path = os.path.join(ckpt_dir, name)
        try:
            tensors, state = verified(path)
        except ValueError as e:
            problems.append(str(e))
            if first:
                print(f"skipping checkpoint {path}: {e}", file=sys.stderr)
            continue
        if first:
            for damaged in names[:k]:  # newer than this one, and skipped above
                remove(os.path.join(ckpt_dir, damaged))
            if read_latest(ckpt_dir) != name:
                atomic_write_text(latest, name + "\n")
        return tensors, {**state, "loaded_from": path}
    if problems:
        raise ValueError(f"{ckpt_dir}: no intact checkpoint to resume from ({'; '.join(problems)}); start "
                         f"again without --resume in a new --out (or delete {ckpt_dir})")
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to resume from; start without --resume")


def rng_state():
    """This process's random generator states as (JSON-able dict, {name: tensor})."""
    py = random.getstate()  # (version, 625 ints, gauss_next)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()  # this process's current GPU
    return js, tensors


def set_rng_state(js, tensors):
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"].clone())
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"].clone())


def optimizer_to_checkpoint(optimizer):
    """Split optimizer.state_dict() into tensors {optim.<param index>.<key>: tensor} and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_checkpoint(optimizer, tensors, js):
    state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v.clone()
    for key, v in js["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    # JSON has no tuples: give AdamW its (beta1, beta2) back as one
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in js["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM only sets a flag; the loop sees it between steps, saves a checkpoint and
    exits. Stopping there, never mid-update, keeps the saved state consistent. A second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt  # second Ctrl-C: stop now (the last checkpoint on disk is intact)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# A training run's state


# The settings a checkpoint must share with the run resuming it: anything else would silently train a
# different model or feed different batches. (--max-steps, --lr, --eval-every, ... may change.)
RESUME_MUST_MATCH = ("model", "full", "data", "val_data", "val_fraction", "train_on", "max_len", "overflow",
                     "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "batch_size", "grad_accum",
                     "seed")


def check_resume(saved, cfg, world_size):
    """Refuse to resume a checkpoint that lacks what resuming reads, or was made with different
    model/data/LoRA/batch settings."""
    missing = [k for k in STATE_KEYS if k not in saved]
    if missing or not isinstance(saved.get("args"), dict):
        raise ValueError(f"{saved.get('loaded_from', cfg.out)}: its state.json lacks "
                         f"{', '.join(missing) or 'args'}: not a checkpoint train.py wrote; start again "
                         "without --resume in a new --out")
    args = saved["args"]
    for k in RESUME_MUST_MATCH:
        if args.get(k) != getattr(cfg, k):
            raise ValueError(f"--resume: the checkpoint in {cfg.out}/ckpt was made with "
                             f"--{k.replace('_', '-')} {args.get(k)}, this run has {getattr(cfg, k)}; resume "
                             "with the same setting or start a new --out")
    if saved["world_size"] != world_size:
        raise ValueError(f"--resume: the checkpoint was made with {saved['world_size']} processes, this run "
                         f"has {world_size}; the batch order per process would differ")


def save_run_checkpoint(ckpt_dir, setup, progress, stream, cfg):
    """Everything needed to continue exactly: setup's trainable weights (.named), optimizer, scaler; the
    progress (.step, .best_val, .bad_evals, .best_weights); the stream's position; the settings. Every
    process passes its random generator states to rank 0 (a collective: all processes call this at the
    same steps); rank 0 writes."""
    rt, optimizer, scaler = setup.rt, setup.optimizer, setup.scaler
    rng_js, rng_tensors = rng_state()
    if rt.ddp:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, (rng_js, {k: v.cpu() for k, v in rng_tensors.items()}))
    else:
        gathered = [(rng_js, rng_tensors)]
    if not rt.master:
        return
    tensors = {f"model.{n}": p for n, p in setup.named}
    opt_tensors, opt_js = optimizer_to_checkpoint(optimizer)
    tensors.update(opt_tensors)
    for r, (_, rank_tensors) in enumerate(gathered):
        tensors.update({f"rng.{r}.{k}": v for k, v in rank_tensors.items()})
    if progress.best_weights is not None:
        tensors.update({f"best.{n}": v for n, v in progress.best_weights.items()})
    state = {"step": progress.step, "best_val": progress.best_val, "bad_evals": progress.bad_evals,
             "data": stream.position(), "args": asdict(cfg), "world_size": rt.world_size,
             "optimizer": opt_js, "scaler": scaler.state_dict(), "rng": [js for js, _ in gathered]}
    save_checkpoint(ckpt_dir, progress.step, tensors, state)


def restore(tensors, saved, setup, stream):
    """Load a checkpoint into the freshly built run (setup's weights, optimizer, scaler; the stream's
    position; this process's random generators); return the progress fields (step, best_val,
    bad_evals, best_weights) as a dict."""
    rt, optimizer, scaler = setup.rt, setup.optimizer, setup.scaler
    ours = dict(setup.named)
    got = {k[len("model."):] for k in tensors if k.startswith("model.")}
    if got != set(ours):
        raise ValueError(f"--resume: the checkpoint's trainable weights do not match this model "
                         f"(missing {sorted(set(ours) - got)[:3]}, unexpected {sorted(got - set(ours))[:3]})")
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(tensors[f"model.{n}"])
    optimizer_from_checkpoint(optimizer, tensors, saved["optimizer"])
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    stream.seek(saved["data"]["epoch"], saved["data"]["index"])
    prefix = f"rng.{rt.rank}."
    set_rng_state(saved["rng"][rt.rank], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    best = {k[len("best."):]: v.clone() for k, v in tensors.items() if k.startswith("best.")}
    return dict(step=saved["step"], best_val=saved["best_val"], bad_evals=saved["bad_evals"],
                best_weights=best or None)
