"""Loss weights w(lambda) over log-SNR and the weighted x-space mean squared error.

Every loss in the project is written in x space: weight(lambda) * mean((xhat - target)^2).
Because eps - eps_hat = alpha (xhat - x) / sigma and v - v_hat = (xhat - x) / sigma, the usual
losses of other parameterisations are x-space losses with these weights:

- 'constant':      1                       (plain x-MSE)
- 'snr':           exp(lambda)             (eps-MSE)
- 'v_mse':         1 + exp(lambda)         (v-MSE, since 1 / sigma^2 = 1 + alpha^2 / sigma^2)
- 'truncated_snr': max(exp(lambda), 1)     (the default of progressive distillation)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WEIGHTINGS = ("truncated_snr", "constant", "snr", "v_mse")


def check_weighting(name: str) -> str:
    """Return `name` if it is a known weighting, else raise a ValueError naming them."""
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting={name!r} is unknown: accepted {', '.join(WEIGHTINGS)}.")
    return name


def loss_weight(logsnr: jax.Array, *, name: str = "truncated_snr") -> jax.Array:
    """Weight w(lambda) of the x-space squared error; any shape, float32, same shape as logsnr.

    Args:
      logsnr: log-SNR lambda = log(alpha^2 / sigma^2) of the noisy input.
      name: one of WEIGHTINGS ('truncated_snr', 'constant', 'snr', 'v_mse').
    """
    check_weighting(name)
    logsnr = jnp.asarray(logsnr, jnp.float32)
    if name == "constant":
        return jnp.ones_like(logsnr)
    if name == "snr":
        return jnp.exp(logsnr)
    if name == "v_mse":
        return 1.0 + jnp.exp(logsnr)
    # exp(max(lambda, 0)) == max(exp(lambda), 1) without overflowing first.
    return jnp.exp(jnp.maximum(logsnr, 0.0))


def weighted_mse(
    xhat: jax.Array,
    target: jax.Array,
    logsnr: jax.Array,
    *,
    weighting: str = "truncated_snr",
) -> jax.Array:
    """Per-example loss [B]: w(lambda) * mean over non-batch axes of (xhat - target)^2.

    Args:
      xhat: prediction [B, ...].
      target: regression target [B, ...] (data x, guided teacher xhat, or xtilde).
      logsnr: [B] log-SNR of the noisy input the prediction was made from.
      weighting: one of WEIGHTINGS.
    """
    if xhat.shape != target.shape:
        raise ValueError(f"xhat shape {xhat.shape} must equal target shape {target.shape}.")
    err = jnp.square(xhat.astype(jnp.float32) - target.astype(jnp.float32))
    mse = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    return loss_weight(logsnr, name=weighting) * mse
