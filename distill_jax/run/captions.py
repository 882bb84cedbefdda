"""A text run's caption conditions, encoded once by an imported pipeline's encoder, cached on disk.

A run whose text encoder is an imported pipeline's (config.text.pipeline) encodes its
captions itself, in place of the conditions stored with the dataset. A condition is large
(236 KB for SD 1.5: 77 x 768 float32; 5.5 MB for SD3: 334 x 4096), so they are not held in
memory: every distinct caption of a split is encoded once into `WORKDIR/captions/SPLIT.npy`
([distinct captions, L, D] float32, written chunk by chunk through a memory map), and the
training source reads the rows its batches need from the memory-mapped file
(`sources.IndexedRows`: example i's condition is row index[i]).

Process 0 encodes and writes; the others wait at a barrier and map the same file (a pod's
workdir is shared). `SPLIT.json` beside it records what the rows encode (the captions'
sha256, the encoder's source and settings): a cache that does not match is encoded again, so
a changed encoder or data never reuses stale rows. Without a workdir (a plan) the conditions
are encoded in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from etils import epath

from distill_jax import files, parallel
from distill_jax.data import sources

if TYPE_CHECKING:
    from distill_jax.run.run import Run

CAPTIONS_DIR = "captions"
CHUNK = 256  # captions per encoder call


def caption_conditions(run: Run, split: str) -> tuple[Sequence, sources.IndexedRows]:
    """(source, conditions [N, L, D]) of `split`: each caption's condition by the run's encoder.

    The conditions are a lazy view of the cached distinct rows (see the module docstring).
    """
    source, _ = sources.load_source(run.config.data, split=split, seed=run.config.seed)
    distinct, inverse = np.unique(sources.captions_of(source), return_inverse=True)
    if run.workdir is None:
        rows = np.concatenate(list(_encoded_chunks(run, distinct)))
    else:
        rows = _cached_rows(run, split, distinct)
    return source, sources.IndexedRows(rows, inverse.astype(np.int64))


def _encoded_chunks(run: Run, distinct: np.ndarray):
    encoder = run.text_encoder()
    for start in range(0, len(distinct), CHUNK):
        yield np.asarray(encoder.encode(list(distinct[start : start + CHUNK]))[0], np.float32)


def _key(run: Run, distinct: np.ndarray) -> dict:
    """What the cached rows encode: the captions and the encoder's identity and settings."""
    text = run.config.text
    record = (run.finished(run.stage("teacher")) or {}).get("imported") or {}
    digest = hashlib.sha256("\n".join(distinct.tolist()).encode("utf-8")).hexdigest()
    return dict(
        captions=len(distinct),
        captions_sha256=digest,
        encoder=os.path.basename(str(record.get("source", ""))) or str(text.pipeline),
        weights_sha256=record.get("weights_sha256"),
        max_tokens=int(text.max_tokens),
        clip_skip=int(text.clip_skip),
    )


def _paths(run: Run, split: str) -> tuple[epath.Path, epath.Path]:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
    directory = run.workdir / CAPTIONS_DIR
    return directory / f"{name}.npy", directory / f"{name}.json"


def _matches(rows_path: epath.Path, key_path: epath.Path, key: dict) -> bool:
    if not (rows_path.exists() and key_path.exists()):
        return False
    try:
        return json.loads(key_path.read_text()) == key
    except ValueError:
        return False


def _cached_rows(run: Run, split: str, distinct: np.ndarray) -> np.ndarray:
    """The distinct captions' conditions, memory-mapped from the workdir (written if needed)."""
    rows_path, key_path = _paths(run, split)
    key = _key(run, distinct)
    if jax.process_index() == 0 and not _matches(rows_path, key_path, key):
        _write(run, distinct, rows_path, key_path, key)
    parallel.sync_processes(f"captions {rows_path.name}")
    return np.load(os.fspath(rows_path), mmap_mode="r")


def _write(run: Run, distinct, rows_path: epath.Path, key_path: epath.Path, key: dict) -> None:
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.unlink(missing_ok=True)  # the rows are replaced: the old key no longer holds
    chunks = _encoded_chunks(run, distinct)
    first = next(chunks)
    shape = (len(distinct), *first.shape[1:])
    files.check_room(
        f"caching the conditions of {len(distinct)} captions",
        memory=0,
        disk=int(np.prod(shape)) * 4,
        path=rows_path,
    )
    with files.atomic_path(rows_path) as tmp:
        rows = np.lib.format.open_memmap(os.fspath(tmp), "w+", np.float32, shape)
        rows[: len(first)] = first
        offset = len(first)
        for chunk in chunks:
            rows[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        rows.flush()
        del rows
    files.atomic_write(key_path, json.dumps(key, indent=1, sort_keys=True))
