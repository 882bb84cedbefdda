"""The checked safetensors reader: good files read as safetensors itself reads them; every
damaged file is refused with a message that names what is wrong and what is accepted; and a
damaged weight file in a diffusers folder is refused by the import in one line."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from distill_jax.safetensors_file import read_safetensors_file

DATA = pathlib.Path(__file__).resolve().parent / "data" / "diffusers"


def _write(path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _good(tmp_path) -> str:
    path = tmp_path / "good.safetensors"
    rng = np.random.default_rng(0)
    save_file(
        {
            "a.weight": rng.normal(size=(3, 4)).astype(np.float32),
            "b.bias": rng.normal(size=(5,)).astype(np.float16),
            "empty": np.zeros((0, 2), np.float32),
            "embeddings.position_ids": np.arange(6, dtype=np.int64)[None],
        },
        str(path),
    )
    return str(path)


def test_good_file_reads_as_safetensors_reads_it(tmp_path):
    path = _good(tmp_path)
    got = read_safetensors_file(path)
    with safe_open(path, "np") as f:
        assert set(got) == set(f.keys())
        for name in f.keys():
            want = f.get_tensor(name)
            assert got[name].dtype == np.float32 and got[name].shape == want.shape
            np.testing.assert_array_equal(got[name], want.astype(np.float32))


def test_bfloat16_is_the_top_half_of_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 1e-3, 65504.0], np.float32)
    top = (values.view(np.uint32) >> 16).astype(np.uint16)
    path = _write(
        tmp_path / "bf16.safetensors",
        {"x": {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]}},
        top.tobytes(),
    )
    want = (top.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(read_safetensors_file(path)["x"], want)
    np.testing.assert_allclose(want, values, rtol=1e-2)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


ZEROS = np.zeros(4, np.float32).tobytes()
DAMAGED = {
    # id: (header or raw file bytes, data, phrases of the message)
    "empty": (b"", None, ["fewer than the 8"]),
    "header_length_2_60": (struct.pack("<Q", 1 << 60) + b"{}", None, ["header length is"]),
    "header_not_json": (struct.pack("<Q", 4) + b"{{{{", None, ["header is not JSON"]),
    "header_a_list": ([], b"", ["not a JSON object"]),
    "no_offsets": ({"x": {"dtype": "F32", "shape": [2]}}, ZEROS, ["'x'", "data_offsets"]),
    "float8": ({"x": _entry("F8_E4M3", offsets=(0, 2))}, ZEROS, ["'x'", "F8_E4M3", "F32, F16"]),
    "int8_weights": ({"w": _entry("I8", offsets=(0, 2))}, ZEROS, ["'w'", "dtype I8", "BF16"]),
    "int64_weights": ({"w": _entry("I64", offsets=(0, 16))}, ZEROS * 2, ["'w'", "dtype I64"]),
    "negative_size": ({"x": _entry(shape=(-3,))}, ZEROS, ["'x'", "shape [-3]"]),
    "size_mismatch": ({"x": _entry(shape=(3,))}, ZEROS, ["'x'", "12 bytes"]),
    "beyond_data": ({"x": _entry(offsets=(12, 20))}, ZEROS, ["'x'", "[12, 20)", "16 data"]),
    "overlap": (
        {"x": _entry(offsets=(0, 8)), "y": _entry(offsets=(4, 12))},
        ZEROS,
        ["'x'", "'y'", "overlap"],
    ),
    "nan": ({"x": _entry()}, np.array([1.0, np.nan], np.float32).tobytes(), ["'x'", "1 NaN"]),
    "inf_f16": (
        {"x": _entry("F16", shape=(4,))},
        np.array([1, np.inf, -np.inf, 0], np.float16).tobytes(),
        ["'x'", "2 NaN or infinite"],
    ),
}


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_damaged_file_is_refused_naming_what_is_wrong(tmp_path, case):
    header, data, phrases = DAMAGED[case]
    path = tmp_path / f"{case}.safetensors"
    if isinstance(header, bytes):
        path.write_bytes(header)
    else:
        _write(path, header, data)
    with pytest.raises(ValueError) as error:
        read_safetensors_file(str(path))
    for phrase in phrases:
        assert phrase in str(error.value), str(error.value)


def test_truncated_real_file_is_refused(tmp_path):
    path = tmp_path / "cut.safetensors"
    whole = pathlib.Path(_good(tmp_path)).read_bytes()
    path.write_bytes(whole[:-10])
    with pytest.raises(ValueError, match="truncated or damaged"):
        read_safetensors_file(str(path))


def test_import_refuses_a_damaged_weight_file_in_one_line(tmp_path):
    """A DiT folder whose weights hold a NaN: the import names the file and the tensor."""
    from distill_jax.interop import core
    from distill_jax.interop import dit as reader

    folder = tmp_path / "dit_tiny"
    shutil.copytree(DATA / "dit_tiny", folder)
    weights = next(p for p in (folder / "transformer").iterdir() if p.suffix == ".safetensors")
    tensors = read_safetensors_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    save_file(tensors, str(weights))
    with pytest.raises(core.FolderError) as error:
        reader.read_dit_folder(str(folder))
    message = str(error.value)
    assert "\n" not in message and os.fspath(weights) in message
    assert repr(name) in message and "NaN" in message
