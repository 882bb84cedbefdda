"""The teacher's loss: x-hat regression with label dropout for classifier-free guidance.

loss = weight(lambda_t) * ||xhat(z_t, c) - x||^2 averaged over the batch, with t ~ U[0, 1],
z_t = alpha_t x + sigma_t eps, and each condition replaced by the null condition (class index
num_classes, or the empty prompt's text condition) with probability p_uncond so the same
network also learns the unconditional model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from distill_jax.diffusion import guidance, schedule, weighting
from distill_jax.models import denoiser
from distill_jax.training.state import LossFn

PyTree = Any


def make_teacher_loss(
    model: nn.Module, *, null_condition: Any, diffusion: ml_collections.ConfigDict
) -> LossFn:
    """Loss function (params, batch, rng, teacher) -> (loss, metrics) of teacher training.

    batch: {'x': [B, ...] float32 data in [-1, 1] (or toy data), 'condition': [B] int32 class
    labels or a text condition [B, L, D]}; `null_condition` is what a dropped one becomes
    (`Run.null_condition`: the number of classes, or the empty prompt's [L, D]).
    """
    bounds = dict(logsnr_min=diffusion.logsnr_min, logsnr_max=diffusion.logsnr_max)
    p_uncond = float(diffusion.p_uncond)
    weighting_name = diffusion.loss_weighting

    def loss_fn(params: PyTree, batch: dict, rng: jax.Array, teacher: PyTree):
        del teacher  # the teacher stage learns from data alone
        x, conditions = batch["x"], guidance.as_condition(batch["condition"])
        t_rng, eps_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
        batch_size = x.shape[0]
        t = jax.random.uniform(t_rng, (batch_size,))
        eps = jax.random.normal(eps_rng, x.shape, x.dtype)
        z = schedule.q_sample(x, t, eps, **bounds)
        dropped = jax.random.bernoulli(drop_rng, p_uncond, (batch_size,))
        dropped = dropped.reshape(dropped.shape + (1,) * (conditions.ndim - 1))
        conditions = jnp.where(dropped, guidance.null_like(conditions, null_condition), conditions)
        denoise = denoiser.make_denoise_fn(model, params, train=True, dropout_rng=dropout_rng)
        xhat = denoise(z, t, conditions)
        logsnr = schedule.logsnr_schedule_cosine(t, **bounds)
        per_example = weighting.weighted_mse(xhat, x, logsnr, weighting=weighting_name)
        return jnp.mean(per_example), {"x_mse": jnp.mean((xhat - x) ** 2)}

    return loss_fn
