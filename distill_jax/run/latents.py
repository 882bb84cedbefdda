"""The latent space of a latent run: the encoded train split its autoencoder stage caches.

When a latent run's autoencoder stage finishes (trained here, or imported with a diffusers
pipeline's vae/), `encode_train_split` encodes the train split once (the posterior means: with
LDM's tiny KL weight the posterior is narrow, so a sample adds nothing but noise) into
LATENTS_FILE and LABELS_FILE of its directory, and the stage records `Latents`: the scale
(and shift) diffusion runs at and one latent's shape. Teacher, stage one and stage two read
those cached latents, scaled (`ScaledLatents`; DiT and MaxDiffusion train on cached latents
the same way), so their steps cost what they cost in pixel space, at the latent's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from distill_jax import files, parallel
from distill_jax.data import sources
from distill_jax.run.workdir import LABELS_FILE, LATENTS_FILE


@dataclasses.dataclass(frozen=True)
class Latents:
    """The latent space of a latent run: what its autoencoder stage recorded when it finished.

    Attributes:
      scale: diffusion runs on (mean(q(z | x)) - shift) * scale; for an autoencoder trained
        here 1 / std of the encoded train split, for an imported VAE its scaling_factor.
      shape: one latent's shape (h, w, c).
      shift: an imported VAE's shift_factor (0 for this library's autoencoder and SD 1.x/2.x).
    """

    scale: float
    shape: tuple[int, ...]
    shift: float = 0.0

    @classmethod
    def from_record(cls, record: dict | None) -> Latents | None:
        """The `latents` entry of a FINISHED.json record (None if it has none)."""
        entry = (record or {}).get("latents")
        if not isinstance(entry, dict):
            return None
        shape = tuple(int(d) for d in entry["shape"])
        return cls(float(entry["scale"]), shape, float(entry.get("shift", 0.0)))

    def to_record(self) -> dict:
        """The FINISHED.json entry."""
        entry = {"scale": self.scale, "shape": list(self.shape)}
        if self.shift:
            entry["shift"] = self.shift
        return {"latents": entry}

    def matches(self, other: Latents) -> bool:
        """The same latent space (shape, shift, and scale to 1e-6)."""
        return (
            self.shape == other.shape
            and abs(self.shift - other.shift) < 1e-6
            and abs(self.scale / other.scale - 1.0) < 1e-6
        )


class ScaledLatents(sources.ArraySource):
    """The cached latents (memory-mapped), scaled when an example is read."""

    def __init__(self, latents: np.ndarray, conditions: np.ndarray, scale: float):
        super().__init__({"x": latents, "condition": conditions})
        self.scale = np.float32(scale)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, latents scaled to float32."""
        examples = super().take(indices)
        return {
            "x": np.asarray(examples["x"], np.float32) * self.scale,
            "condition": examples["condition"],
        }


def read_cached(directory: epath.Path, latents: Latents, conditions: np.ndarray | None = None):
    """The cached train split of the autoencoder stage in `directory`, scaled.

    `conditions` replaces the cached ones (an imported pipeline's text conditions).
    """
    cached = np.load(os.fspath(directory / LATENTS_FILE), mmap_mode="r")
    if conditions is None:
        conditions = np.load(os.fspath(directory / LABELS_FILE), mmap_mode="r")
    return ScaledLatents(cached, conditions, latents.scale)


def _encoded_batches(encode: Callable, source, size: int, batch_size: int, start: int, stop: int):
    """(encoded latents float32 [b, h, w, c], labels [b]) of source[start:stop], in order.

    The labels are int32 class labels, or on a text dataset the float16 text conditions
    [b, L, 384] (stored at the precision the dataset holds them).
    """
    apply = jax.jit(lambda fn, images: fn(images))
    for first in range(start, stop, batch_size):
        indices = np.arange(first, min(first + batch_size, stop))
        examples = sources.read_examples(source, indices, image_size=size)
        chunk = examples["x"]
        pad = batch_size - len(chunk)  # one compiled shape for every chunk
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
        means = np.asarray(apply(encode, padded), np.float32)[: len(chunk)]
        labels = examples["condition"]
        yield means, labels.astype(np.float16 if labels.ndim > 1 else np.int32)


def _part_names(process: int, processes: int) -> tuple[str, str, str]:
    """Process `process`'s latents, labels and statistics files (the final files alone)."""
    if processes == 1:
        return LATENTS_FILE, LABELS_FILE, ""
    tag = f".part{process:05d}-of-{processes:05d}"
    return LATENTS_FILE + tag, LABELS_FILE + tag, f"latents_stats{tag}.json"


def _encode_part(encode, source, size, batch_size, directory, process, processes) -> dict:
    """Encode this process's contiguous share of the split into its part files.

    Returns the share's statistics (sums of the latents and their squares, the element count,
    one latent's shape), also written to its statistics file when there are several parts.
    """
    n = len(source)
    start, stop = process * n // processes, (process + 1) * n // processes
    latents_name, labels_name, stats_name = _part_names(process, processes)
    stats = {"sum": 0.0, "sum_sq": 0.0, "count": 0, "shape": None}
    latents = labels = None
    with contextlib.ExitStack() as stack:
        offset = 0
        for means, batch_labels in _encoded_batches(encode, source, size, batch_size, start, stop):
            if latents is None:
                stats["shape"] = list(means.shape[1:])
                tmp = stack.enter_context(files.atomic_path(directory / latents_name))
                rows = (stop - start, *means.shape[1:])
                latents = np.lib.format.open_memmap(os.fspath(tmp), "w+", np.float32, rows)
                tmp = stack.enter_context(files.atomic_path(directory / labels_name))
                rows = (stop - start, *batch_labels.shape[1:])
                labels = np.lib.format.open_memmap(os.fspath(tmp), "w+", batch_labels.dtype, rows)
            latents[offset : offset + len(means)] = means
            labels[offset : offset + len(means)] = batch_labels
            offset += len(means)
            stats["sum"] += float(np.sum(means, dtype=np.float64))
            stats["sum_sq"] += float(np.sum(np.square(means, dtype=np.float64)))
            stats["count"] += int(means.size)
        if latents is not None:
            latents.flush()
            labels.flush()
            del latents, labels
    if stats_name:
        files.atomic_write(directory / stats_name, json.dumps(stats))
    logging.info("[latents] process %d encoded examples %d to %d of %d", process, start, stop, n)
    return stats


def _join_parts(directory: epath.Path, processes: int) -> None:
    """Process 0: the parts' rows into the final files, in order; the parts removed."""
    for final in (LATENTS_FILE, LABELS_FILE):
        names = [_part_names(p, processes)[final == LABELS_FILE] for p in range(processes)]
        names = [name for name in names if (directory / name).exists()]  # empty shares: none
        parts = [np.load(os.fspath(directory / name), mmap_mode="r") for name in names]
        shape = (sum(len(part) for part in parts), *parts[0].shape[1:])
        with files.atomic_path(directory / final) as tmp:
            joined = np.lib.format.open_memmap(os.fspath(tmp), "w+", parts[0].dtype, shape)
            offset = 0
            for part in parts:
                joined[offset : offset + len(part)] = part
                offset += len(part)
            joined.flush()
            del joined
        for name in names:
            (directory / name).unlink()
    for p in range(processes):
        (directory / _part_names(p, processes)[2]).unlink()


def encode_train_split(
    encode: Callable,
    data_config: ml_collections.ConfigDict,
    directory: epath.Path,
    *,
    batch_size: int = 256,
) -> tuple[tuple[int, ...], float]:
    """Encode the train split into `directory`; return (latent shape, 1 / std of the latents).

    `encode` is an unscaled codec's encoder (`autoencoder.make_codec` with scale 1: the
    posterior means, less an imported VAE's shift). Writes LATENTS_FILE (the encoded split
    [N, h, w, c] float32) and LABELS_FILE ([N] int32, or a text run's conditions [N, L, 384]
    float16), .npy files written batch by batch through a memory map, so the split never has
    to fit in memory and readers can map it too. The std is over every element of every
    latent (one number, as Stable Diffusion's 0.18215).

    The processes of a pod share the work: each encodes a contiguous 1/P of the split into its
    own part files and statistics (the workdir is shared), and after a barrier process 0 joins
    the parts in order; every process sums the same statistics, so all return the same scale.

    Raises:
      FloatingPointError: the latents have no spread (a collapsed autoencoder).
    """
    process, processes = jax.process_index(), jax.process_count()
    source, _ = sources.load_source(data_config, split=data_config.train_split)
    size = int(data_config.image_size)
    stats = [_encode_part(encode, source, size, batch_size, directory, process, processes)]
    parallel.sync_processes("latents_parts_written")
    if processes > 1:
        stats = [
            json.loads((directory / _part_names(p, processes)[2]).read_text())
            for p in range(processes)
        ]
        parallel.sync_processes("latents_stats_read")
        if process == 0:
            _join_parts(directory, processes)
        parallel.sync_processes("latents_joined")
    total, total_sq = (sum(s[key] for s in stats) for key in ("sum", "sum_sq"))
    count = sum(s["count"] for s in stats)
    std = float(np.sqrt(max(total_sq / count - (total / count) ** 2, 0.0)))
    if not np.isfinite(std) or std <= 0:
        raise FloatingPointError(
            f"The encoded train split has standard deviation {std}: the autoencoder "
            "collapsed; lower autoencoder.optimizer.learning_rate or raise "
            "autoencoder.num_steps."
        )
    return tuple(next(s["shape"] for s in stats if s["shape"] is not None)), 1.0 / std
