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
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from distill_jax import files
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

    def __init__(self, latents: np.ndarray, labels: np.ndarray, scale: float):
        super().__init__({"x": latents, "label": labels})
        self.scale = np.float32(scale)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, latents scaled to float32."""
        examples = super().take(indices)
        return {"x": np.asarray(examples["x"], np.float32) * self.scale, "label": examples["label"]}


def read_cached(directory: epath.Path, latents: Latents, labels: np.ndarray | None = None):
    """The cached train split of the autoencoder stage in `directory`, scaled.

    `labels` replaces the cached labels (an imported pipeline's text conditions).
    """
    cached = np.load(os.fspath(directory / LATENTS_FILE), mmap_mode="r")
    if labels is None:
        labels = np.load(os.fspath(directory / LABELS_FILE), mmap_mode="r")
    return ScaledLatents(cached, labels, latents.scale)


def _encoded_batches(encode: Callable, data_config: ml_collections.ConfigDict, batch_size: int):
    """(encoded latents float32 [b, h, w, c], labels [b]) of the train split, in order.

    The labels are int32 class labels, or on a text dataset the float16 text conditions
    [b, L, 384] (stored at the precision the dataset holds them).
    """
    source, _ = sources.load_source(data_config, split=data_config.train_split)
    size = int(data_config.image_size)
    apply = jax.jit(lambda fn, images: fn(images))
    for start in range(0, len(source), batch_size):
        indices = np.arange(start, min(start + batch_size, len(source)))
        examples = sources.read_examples(source, indices, image_size=size)
        chunk = examples["x"]
        pad = batch_size - len(chunk)  # one compiled shape for every chunk
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
        means = np.asarray(apply(encode, padded), np.float32)[: len(chunk)]
        labels = examples["label"]
        yield len(source), means, labels.astype(np.float16 if labels.ndim > 1 else np.int32)


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

    Raises:
      FloatingPointError: the latents have no spread (a collapsed autoencoder).
    """
    writing = jax.process_index() == 0  # every process encodes the same; one writes
    total, total_sq, count, offset, shape = 0.0, 0.0, 0, 0, ()
    latents = labels = None
    with contextlib.ExitStack() as stack:
        for num, means, batch_labels in _encoded_batches(encode, data_config, batch_size):
            shape = tuple(means.shape[1:])
            if writing and latents is None:
                tmp = stack.enter_context(files.atomic_path(directory / LATENTS_FILE))
                latents = np.lib.format.open_memmap(os.fspath(tmp), "w+", np.float32, (num, *shape))
                tmp = stack.enter_context(files.atomic_path(directory / LABELS_FILE))
                label_shape = (num, *batch_labels.shape[1:])
                labels = np.lib.format.open_memmap(
                    os.fspath(tmp), "w+", batch_labels.dtype, label_shape
                )
            if writing:
                latents[offset : offset + len(means)] = means
                labels[offset : offset + len(means)] = batch_labels
            offset += len(means)
            total += float(np.sum(means, dtype=np.float64))
            total_sq += float(np.sum(np.square(means, dtype=np.float64)))
            count += means.size
        std = float(np.sqrt(max(total_sq / count - (total / count) ** 2, 0.0)))
        if not np.isfinite(std) or std <= 0:
            raise FloatingPointError(
                f"The encoded train split has standard deviation {std}: the autoencoder "
                "collapsed; lower autoencoder.optimizer.learning_rate or raise "
                "autoencoder.num_steps."
            )
        if writing:
            latents.flush()
            labels.flush()
            del latents, labels
    return shape, 1.0 / std
