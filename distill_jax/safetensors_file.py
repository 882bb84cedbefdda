"""Reading a safetensors file that may be damaged: every check before any tensor is used.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}}, plus an optional "__metadata__"),
then the data; offsets count from the data's start. `read_safetensors_file` checks the header
(length within the file, JSON, each entry's fields), each tensor's dtype (F32, F16, BF16; an
integer index buffer named '*position_ids' as well), that its bytes are shape x item size,
within the data, and overlap no other tensor's, and that its values are finite; then returns
float32 arrays. Every refusal is a ValueError whose text names the tensor and what is
accepted, so the readers above wrap it in one line with the file's path. Numpy reads the
bytes through a memory map: no PyTorch, no loading a multi-gigabyte file twice.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

# dtype -> (bytes per element, numpy type or None for bfloat16, decoded by hand)
FLOAT_DTYPES = {"F32": (4, np.float32), "F16": (2, np.float16), "BF16": (2, None)}
INDEX_DTYPES = {"I64": (8, np.int64), "I32": (4, np.int32)}
INDEX_BUFFER_SUFFIX = "position_ids"  # transformers' text encoders save it as a buffer
ACCEPTED = "F32, F16 or BF16 (I64/I32 only for a '*position_ids' buffer)"


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as float32 numpy, checked (see the module doc).

    Raises:
      ValueError: the file is not a whole safetensors file, or a tensor has another dtype or
        non-finite values; the message names the tensor. OSError: it cannot be read.
    """
    entries, data_start, data_size = _checked_entries(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if data_size else None
    return {name: _decode(name, entry, data) for name, entry in entries.items()}


def read_safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of one safetensors file from its header alone (checked, nothing read).

    What a reader compares a config's sizes with before it builds a model.
    """
    entries, _, _ = _checked_entries(path)
    return {name: shape for name, (_, shape, _, _) in entries.items()}


def _checked_entries(path: str) -> tuple[dict, int, int]:
    """({name: (dtype, shape, begin, end)}, where the data starts, its size): checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(
                f"not a safetensors file: {size} bytes, fewer than the 8 of its header length"
            )
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise ValueError(
                f"not a whole safetensors file: its header length is {length} bytes but only "
                f"{size - 8} follow (truncated, or not safetensors)"
            )
        header = _parse_header(f.read(length))
    data_size = size - 8 - length
    entries = {name: _check_entry(name, entry, data_size) for name, entry in header.items()}
    _check_no_overlap(entries)
    return entries, 8 + length, data_size


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def _check_entry(name: str, entry, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each field checked."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"tensor {name!r}: its header entry lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    index = name.endswith(INDEX_BUFFER_SUFFIX) and dtype in INDEX_DTYPES
    if dtype not in FLOAT_DTYPES and not index:
        raise ValueError(f"tensor {name!r} has dtype {dtype}: accepted {ACCEPTED}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ValueError(f"tensor {name!r} has shape {shape!r}: accepted a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}: accepted [begin, end]")
    begin, end = offsets
    want = math.prod(shape) * (INDEX_DTYPES if index else FLOAT_DTYPES)[dtype][0]
    if end - begin != want or not 0 <= begin <= end <= data_size:
        raise ValueError(
            f"tensor {name!r}: bytes [{begin}, {end}) do not hold its {dtype} shape {shape} "
            f"({want} bytes) within the file's {data_size} data bytes (truncated or damaged)"
        )
    return dtype, tuple(shape), begin, end


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(entries: dict) -> None:
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
    reach, owner = 0, None  # the furthest end so far, and whose it is
    for begin, end, name in spans:
        if begin == end:  # an empty tensor holds no bytes
            continue
        if begin < reach:
            raise ValueError(f"tensors {owner!r} and {name!r} overlap in the file's data")
        reach, owner = end, name


def _decode(name: str, entry: tuple, data) -> np.ndarray:
    dtype, shape, begin, end = entry
    raw = np.zeros(0, np.uint8) if data is None else data[begin:end]
    if dtype in INDEX_DTYPES:
        return raw.view(INDEX_DTYPES[dtype][1]).reshape(shape).astype(np.float32)
    numpy_type = FLOAT_DTYPES[dtype][1]
    if numpy_type is None:  # bfloat16: the top half of a float32
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.view(numpy_type).astype(np.float32)
    values = values.reshape(shape)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(
            f"tensor {name!r} holds {bad} NaN or infinite values of {values.size}: "
            "accepted finite weights only"
        )
    return values
