"""tasks: the built-in datasets, each a generator (records for train/val/test) and a scorer (reply vs
reference), offline and reproducible: the same code writes the same bytes (a test checks the shipped files).

    triage    task tuning: a support message -> one line of strict JSON (tasks/triage.py)
    instruct  instruction tuning: 27 small families, 4 held out of training (tasks/instruct.py)
    knowledge facts about Nimbus from a document store that changes: fine-tuning vs retrieval (tasks/knowledge.py)

resolve_dataset turns a built-in name into data/NAME/SPLIT.jsonl (writing it first if missing); any other
name is a file path, used as given.
"""

import json
from pathlib import Path

from plumbing.files import atomic_write_text
from plumbing.records import load_records
from tasks import instruct, knowledge, triage

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SPLITS = ("train", "val", "test")
BUILTIN_DATASETS = ("triage", "instruct", "knowledge")  # the first is the default
BUILDERS = {"triage": triage.build_triage, "instruct": instruct.build_instruct,
            "knowledge": knowledge.build_knowledge}
EXTRA_SPLITS = {"knowledge": ("test_v2", "docs_v1", "docs_v2")}  # the changed store's questions, the stores


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
        splits = SPLITS + EXTRA_SPLITS.get(name_or_path, ())
        if split not in splits:
            raise ValueError(f"unknown split {split!r} of {name_or_path}: expected one of {', '.join(splits)}")
        path = Path(data_dir) / name_or_path / f"{split}.jsonl"
        if not path.is_file():
            write_dataset(name_or_path, data_dir)
        return path
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"{name_or_path}: not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) and no such file")
    return path


def load_items(data, split, limit):
    """(records, path, split or None): the evaluated records (dicts with "messages" and any other keys). A
    built-in name gives that split; a file is evaluated as given."""
    path = resolve_dataset(data, split)  # a built-in's split file, or the file itself (ValueError if missing)
    if data not in BUILTIN_DATASETS:
        split = None
    records = load_records(path)
    return (records[:limit] if limit > 0 else records), path, split


def load_store(data, version):
    """The knowledge task's document store, version 1 or 2: a list of texts (data/knowledge/docs_vN.jsonl)."""
    with open(resolve_dataset(data, f"docs_v{version}"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def detect_task(records, data):
    """The scorer for these records: the built-in name, else triage if every reference is a triage label,
    instruct if every record names its family, knowledge if every record names its fact, else exact match."""
    if data in BUILTIN_DATASETS:
        return data
    if all(triage.parse_triage(r["messages"][-1]["content"]) is not None for r in records):
        return "triage"
    if all("family" in r for r in records):
        return "instruct"
    if all("fact" in r and "version" in r for r in records):
        return "knowledge"
    return "exact"


def score(task, reply, record):
    """One reply against its record by the task's own rules: knowledge reads the record's fact and version,
    the others compare with the reference reply (the record's last message)."""
    if task == "knowledge":
        return knowledge.score_knowledge(reply, record)
    reference = record["messages"][-1]["content"]
    return triage.score_triage(reply, reference) if task == "triage" else instruct.score_exact(reply, reference)


def summarize(task, scores, families, held_out):
    """The task's metrics over per-item scores: triage.summarize, instruct.summarize, or plain accuracy."""
    if task == "triage":
        return triage.summarize(scores)
    if task == "instruct":
        return instruct.summarize(scores, families, held_out)
    if task == "knowledge":
        return knowledge.summarize(scores)
    return {"n": len(scores), "accuracy": sum(s["exact"] for s in scores) / max(len(scores), 1)}


def item_scores(scores):
    """Each item's own scores, {name: [0 or 1 per item]}, so a result can be compared item by item or
    re-scored without rerunning the models: triage and instruct give each 0/1 score they compute ("exact"
    named "exact_match"); knowledge gives "accuracy" (the current value) and "stale" (the old one)."""
    if scores and isinstance(scores[0], str):  # knowledge: "right", "stale" or "wrong" per item
        return {"accuracy": [int(s == "right") for s in scores], "stale": [int(s == "stale") for s in scores]}
    keys = [k for k, v in scores[0].items() if isinstance(v, int)] if scores else []
    return {"exact_match" if k == "exact" else k: [s[k] for s in scores] for k in keys}


def report_columns(task):
    """(column names, get): the metrics eval.py's table shows for the task, and get(metrics) -> their
    values (each a rate), in that order."""
    if task == "triage":
        return (["exact", "valid", *triage.TRIAGE_FIELDS],
                lambda m: [m["exact_match"], m["valid"], *(m["fields"][f] for f in triage.TRIAGE_FIELDS)])
    if task == "instruct":
        return ["accuracy", "seen", "held-out"], lambda m: [m["accuracy"], m["seen"], m["held_out"]]
    if task == "knowledge":
        return ["accuracy", "stale"], lambda m: [m["accuracy"], m["stale"]]
    return ["accuracy"], lambda m: [m["accuracy"]]
