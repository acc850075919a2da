"""tasks: the built-in datasets, each a generator (records for train/val/test) and a scorer (reply vs
reference), offline and reproducible: the same code writes the same bytes (a test checks the shipped files).

    triage    task tuning: a support message -> one line of strict JSON (tasks/triage.py)
    instruct  instruction tuning: 27 small families, 4 held out of training (tasks/instruct.py)

resolve_dataset turns a built-in name into data/NAME/SPLIT.jsonl (writing it first if missing); any other
name is a file path, used as given.
"""

import json
from pathlib import Path

from plumbing.files import atomic_write_text
from tasks import instruct, triage

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SPLITS = ("train", "val", "test")
BUILTIN_DATASETS = ("triage", "instruct")  # the first is the default
BUILDERS = {"triage": triage.build_triage, "instruct": instruct.build_instruct}


def write_dataset(name, data_dir=DATA_DIR):
    """Generate built-in dataset `name` (seed 0) and write data_dir/name/{train,val,test}.jsonl.
    Same code, same bytes: the files are reproducible, which a test checks against the shipped ones."""
    paths = []
    for split, records in BUILDERS[name]().items():
        path = Path(data_dir) / name / f"{split}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        paths.append(path)
    return paths


def resolve_dataset(name_or_path, split="train", data_dir=DATA_DIR):
    """A built-in name -> data_dir/NAME/SPLIT.jsonl (generated first if missing); anything else is a file
    path used as given (split is then ignored). Raises ValueError for an unknown name or a missing file."""
    if name_or_path in BUILTIN_DATASETS:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        path = Path(data_dir) / name_or_path / f"{split}.jsonl"
        if not path.is_file():
            write_dataset(name_or_path, data_dir)
        return path
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"{name_or_path}: not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) and no such file")
    return path
