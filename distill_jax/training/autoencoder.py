"""The autoencoder stage of a latent run: its loss, and the latents it hands to the teacher.

loss = mean |decode(z) - x| (L1, or L2 with autoencoder.loss='l2') + kl_weight * KL(q(z|x) ||
N(0, I)) / (pixels per image), z ~ q(z | x) = N(mean, exp(logvar)). L1 is LDM's choice: it
penalises small errors more than L2, which keeps thin strokes sharp instead of averaging them
away. The KL term is per pixel so that kl_weight means what it means in LDM.

When the stage finishes, `encode_train_split` encodes the train split once with the EMA weights
(the posterior means: with kl_weight ~ 1e-6 the posterior is narrow, so a sample adds nothing
but noise) and measures the latent scale 1 / std. Teacher, stage one and stage two read those
cached latents, scaled (DiT and MaxDiffusion train on cached latents the same way), so their
steps cost what they cost in pixel space, at the latent's size.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from distill_jax import files
from distill_jax.data import sources
from distill_jax.models import autoencoder
from distill_jax.run.workdir import LABELS_FILE, LATENTS_FILE
from distill_jax.training.state import LossFn

PyTree = Any


def make_autoencoder_loss(
    model: autoencoder.KLAutoencoder, ae_config: ml_collections.ConfigDict
) -> LossFn:
    """Loss function (params, batch, rng, teacher) -> (loss, metrics) of the autoencoder.

    batch: {'x': float32 images [B, H, W, C] in [-1, 1], 'label': ignored}.
    Metrics: recon_mse (the reconstruction's mean squared error in [-1, 1] units) and kl.
    """
    kl_weight = float(ae_config.kl_weight)
    squared = ae_config.loss == "l2"

    def loss_fn(params: PyTree, batch: dict, rng: jax.Array, teacher: PyTree):
        del teacher  # learns from data alone
        x = batch["x"]
        recon, mean, logvar = model.apply({"params": params}, x, rng)
        error = recon - x
        recon_loss = jnp.mean(jnp.square(error) if squared else jnp.abs(error))
        kl = jnp.mean(autoencoder.kl_divergence(mean, logvar)) / np.prod(x.shape[1:])
        metrics = {"recon_mse": jnp.mean(jnp.square(error)), "kl": kl}
        return recon_loss + kl_weight * kl, metrics

    return loss_fn


def _encoded_batches(model, params, data_config, batch_size: int):
    """(latent means float32 [b, h, w, c], labels [b]) of the train split, in order.

    The labels are int32 class labels, or on a text dataset the float16 text conditions
    [b, L, 384] (stored at the precision the dataset holds them).
    """
    source, _ = sources.load_source(data_config, split=data_config.train_split)
    size = int(data_config.image_size)
    unscaled, _ = autoencoder.make_codec(model, params, 1.0)
    encode = jax.jit(lambda fn, images: fn(images))
    for start in range(0, len(source), batch_size):
        indices = np.arange(start, min(start + batch_size, len(source)))
        examples = sources.read_examples(source, indices, image_size=size)
        chunk = examples["x"]
        pad = batch_size - len(chunk)  # one compiled shape for every chunk
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
        means = np.asarray(encode(unscaled, padded), np.float32)[: len(chunk)]
        labels = examples["label"]
        yield len(source), means, labels.astype(np.float16 if labels.ndim > 1 else np.int32)


def encode_train_split(
    model: autoencoder.KLAutoencoder,
    params: PyTree,
    data_config: ml_collections.ConfigDict,
    directory: epath.Path,
    *,
    batch_size: int = 256,
) -> tuple[tuple[int, ...], float]:
    """Encode the train split into `directory`; return (latent shape, latent scale 1 / std).

    Writes LATENTS_FILE (unscaled posterior means [N, h, w, c] float32) and LABELS_FILE ([N]
    int32, or a text run's conditions [N, L, 384] float16), .npy files written batch by batch
    through a memory map, so the split never has to fit in memory and readers can map it too.
    The std is over every element of every latent (one number, as Stable Diffusion's 0.18215;
    the latents are not shifted).
    """
    writing = jax.process_index() == 0  # every process encodes the same; one writes
    total, total_sq, count, offset, shape = 0.0, 0.0, 0, 0, ()
    latents = labels = None
    with contextlib.ExitStack() as stack:
        for num, means, batch_labels in _encoded_batches(model, params, data_config, batch_size):
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
