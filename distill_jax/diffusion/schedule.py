"""Variance-preserving cosine noise schedule written in log-SNR, with clipping.

Time t lies in [0, 1]: t = 0 is data, t = 1 is noise. With b = arctan(exp(-logsnr_max / 2)) and
a = arctan(exp(-logsnr_min / 2)) - b, the schedule is logsnr(t) = -2 log tan(a t + b), so
logsnr(0) = logsnr_max and logsnr(1) = logsnr_min. alpha^2 = sigmoid(logsnr) and
sigma^2 = sigmoid(-logsnr), hence alpha^2 + sigma^2 = 1.

Every function is pure and jit-able; times and log-SNRs broadcast elementwise. Helpers that
combine a per-example scalar with a data array (`q_sample`, `expand_to`) broadcast from the left.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def _schedule_coefficients(logsnr_min: float, logsnr_max: float) -> tuple[jax.Array, jax.Array]:
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min={logsnr_min} must be below logsnr_max={logsnr_max}.")
    b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
    a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
    return a, b


def logsnr_schedule_cosine(
    t: jax.Array, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX
) -> jax.Array:
    """Log-SNR lambda(t) = -2 log tan(a t + b) of the clipped cosine schedule; any shape."""
    a, b = _schedule_coefficients(logsnr_min, logsnr_max)
    t = jnp.asarray(t, jnp.float32)
    # The clip only removes float32 rounding past the endpoints (e.g. -20.001 at t = 1).
    return jnp.clip(-2.0 * jnp.log(jnp.tan(a * t + b)), logsnr_min, logsnr_max)


def t_from_logsnr(
    logsnr: jax.Array, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX
) -> jax.Array:
    """Inverse of `logsnr_schedule_cosine`: t = (arctan(exp(-logsnr / 2)) - b) / a."""
    a, b = _schedule_coefficients(logsnr_min, logsnr_max)
    logsnr = jnp.asarray(logsnr, jnp.float32)
    return (jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a


def alpha_sigma(logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).

    float32, or float64 for a float64 logsnr (with jax_enable_x64, as exactness tests use).
    """
    logsnr = jnp.asarray(logsnr)
    if logsnr.dtype != jnp.float64:
        logsnr = logsnr.astype(jnp.float32)
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def alpha_sigma_at(
    t: jax.Array, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX
) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) at times t."""
    return alpha_sigma(logsnr_schedule_cosine(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max))


def transition(
    t: jax.Array,
    s: jax.Array,
    *,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
) -> tuple[jax.Array, jax.Array]:
    """(alpha_{t|s}, sigma_{t|s}) of q(z_t | z_s) for s <= t.

    alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,
    computed as sigma_t^2 (1 - exp(logsnr_t - logsnr_s)) to stay accurate for s close to t.
    """
    kw = dict(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    logsnr_t = logsnr_schedule_cosine(t, **kw)
    logsnr_s = logsnr_schedule_cosine(s, **kw)
    alpha_t, sigma_t = alpha_sigma(logsnr_t)
    alpha_s, _ = alpha_sigma(logsnr_s)
    # sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 = sigma_t^2 (1 - snr_t / snr_s).
    var = sigma_t**2 * -jnp.expm1(jnp.minimum(logsnr_t - logsnr_s, 0.0))
    return alpha_t / alpha_s, jnp.sqrt(var)


def expand_to(values: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape per-example values [B] (or a scalar) to broadcast against `like` [B, ...]."""
    values = jnp.asarray(values)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def q_sample(
    x: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    *,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
) -> jax.Array:
    """Sample q(z_t | x): z_t = alpha_t x + sigma_t eps; x and eps [B, ...], t [B] or scalar."""
    alpha, sigma = alpha_sigma_at(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    return expand_to(alpha, x) * x + expand_to(sigma, x) * eps
