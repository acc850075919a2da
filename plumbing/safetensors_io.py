"""plumbing/safetensors_io.py: the safetensors format, read and written by hand (no safetensors package).

A file is 8 bytes little-endian header length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then raw little-endian
tensor bytes, offsets relative to the end of the header. No code runs on load: unlike a pickle, a corrupted
or malicious file can only fail to parse. tests/test_model.py checks both directions against the
safetensors package.
"""

import json
import math
import mmap
import os

import torch

from plumbing.files import atomic_write, refuse_lfs_pointer

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are kilobytes; a huge length means a corrupted file


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor}. The file is memory-mapped (copy-on-write), so tensors
    are paged in only when used. Every length and offset is checked against the file before use."""

    def bad(why):
        return ValueError(f"{path}: not a valid safetensors file ({why}); re-download or re-save it")

    refuse_lfs_pointer(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise bad(f"only {size} bytes")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"header length {n} does not fit in a {size}-byte file: truncated?")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        header.pop("__metadata__", None)
        data_len = size - 8 - n
        tensors, spans = {}, []
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} lacks a known dtype, a shape or data_offsets") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or max(shape, default=0) >= 1 << 48 or not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise bad(f"tensor {name!r}: offsets {begin}..{end} do not hold shape {shape} {info['dtype']} "
                      f"within {data_len} data bytes: truncated?")
        spans.append((begin, end, name))
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            # frombuffer keeps a reference to the mapping, so the tensors stay valid after we return
            t = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=8 + n + begin)
            tensors[name] = t.view(shape)
    spans.sort()
    for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise bad(f"tensors {n1!r} and {n2!r} overlap")
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a .safetensors file, atomically (see atomic_write). Streamed: the header is
    computed from shapes alone, then each tensor is copied to host memory and written in turn, so at most one
    tensor's bytes are in host memory at a time (a gpt2-xl checkpoint is 19 GB; tests/test_model.py checks)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)  # pad so tensor data starts 8-byte aligned (the format allows trailing spaces)

    def write(f):
        f.write(len(h).to_bytes(8, "little") + h)
        for t in tensors.values():
            if t.numel():  # the bytes of a CPU tensor are written straight from its memory, without a copy
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    atomic_write(path, write)