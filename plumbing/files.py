"""plumbing/files.py: writes that a crash or a kill can never leave half done.

Every output handtune writes (weights, adapters, copied tokenizer files, checkpoints, reports, datasets)
goes to a temporary file in the same directory, is fsynced, and is renamed over the real name: readers
see the old file or the new one, never a mix. One exception: metrics.jsonl is appended a line per log
step (plumbing/runs.append_metrics), so a crash can lose the line being written, never the earlier ones.
Machinery beside the learning path; nothing here is about fine-tuning.
"""

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager


def creation_mode(mode):
    """The permissions open() or mkdir() would give a new file or directory: mode minus the process umask.
    (tempfile's mkstemp and mkdtemp ignore the umask and make everything private.)"""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return mode & ~umask


def fsync_dir(path):
    """Make a rename inside `path` durable (POSIX; a no-op where directories cannot be opened)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_file(path):
    """Yield a temporary path in path's directory for a writer that opens files itself (the gguf package's);
    on success fsync it and rename it over path (atomic on POSIX and Windows), on any error delete it: readers
    see the old file or the new one, never a mix."""
    if os.path.isdir(path):  # else the temp file would land beside the directory and the rename fail late
        raise IsADirectoryError(f"{path} is a directory; give the name of the file to write inside it")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, creation_mode(0o666))  # mkstemp makes it private (0600); open() would not
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(directory)  # make the rename itself durable


def atomic_write(path, write):
    """Call write(f) on a temporary file in the same directory, then rename it over path (atomic_file). write
    may stream many chunks."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        write(f)


def remove(path):
    """Delete a file, or a directory with everything in it (what prune and stray-temp cleanup throw away)."""
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def file_digest(path):
    """{"bytes", "sha256"} of a file, read in 16 MiB chunks (a full fine-tune's checkpoint is GBs)."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": h.hexdigest()}


# The largest JSON file handtune reads whole (tokenizer.json of SmolLM2 is 2 MB; configs are kilobytes).
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path, kind=dict, max_bytes=MAX_JSON_BYTES):
    """A whole JSON file, checked: at most max_bytes, UTF-8, parseable, its top level of type kind (dict:
    an object). Every failure is one ValueError naming the file."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{path}: {size:,} bytes, more than the {max_bytes:,} a JSON file of this kind "
                         "may have; not the file handtune expects")
    refuse_lfs_pointer(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}): damaged or cut short; fix or "
                         "re-download it") from None
    except RecursionError:  # a crafted file: [[[[...]]]] deeper than the parser goes
        raise ValueError(f"{path}: JSON nested too deeply to read; not a file handtune wrote") from None
    if kind is not None and not isinstance(obj, kind):
        raise ValueError(f"{path}: the top level is a JSON {type(obj).__name__}, expected "
                         f"{'an object' if kind is dict else kind.__name__}")
    return obj


LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # how every Git LFS pointer file begins


def refuse_lfs_pointer(path):
    """Raise a one-line ValueError if path is a Git LFS pointer (a ~130-byte text stub that a clone without
    git-lfs leaves in place of a large file) rather than the file itself."""
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            raise ValueError(f"{path} is a Git LFS pointer ({os.path.getsize(path)} bytes), not the file itself: run "
                             "`git lfs pull` in its repository, or download the real file")
