"""The autoencoder stage of a latent run: its loss, and the latents it hands to the teacher.

loss = mean |decode(z) - x| (L1, or L2 with autoencoder.loss='l2') + kl_weight * KL(q(z|x) ||
N(0, I)) / (pixels per image), z ~ q(z | x) = N(mean, exp(logvar)). L1 is LDM's choice: it
penalises small errors more than L2, which keeps thin strokes sharp instead of averaging them
away. The KL term is per pixel so that kl_weight means what it means in LDM.

When the stage finishes, `run.latents.encode_train_split` encodes the train split once with
the EMA weights and measures the latent scale 1 / std (see there).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distill_jax.models import autoencoder
from distill_jax.training.state import LossFn

PyTree = Any


def make_autoencoder_loss(
    model: autoencoder.KLAutoencoder, ae_config: ml_collections.ConfigDict
) -> LossFn:
    """Loss function (params, batch, rng, teacher) -> (loss, metrics) of the autoencoder.

    batch: {'x': float32 images [B, H, W, C] in [-1, 1], 'condition': ignored}.
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
