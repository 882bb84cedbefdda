"""A Gaussian-mixture data distribution and its exact denoiser.

Component k (= class k) is N(mean_k, diag(std_k^2)) with prior weight pi_k. Under
z = alpha x + sigma eps, z | k ~ N(alpha mean_k, diag(alpha^2 std_k^2 + sigma^2)) and
E[x | z, k] = mean_k + alpha std_k^2 (z - alpha mean_k) / (alpha^2 std_k^2 + sigma^2).
The unconditional denoiser mixes these with the posterior p(k | z). The label `num_classes`
is the null class (unconditional), matching the networks' null label for guidance.
The exact denoiser is a teacher with zero training error for tests and error measurements.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.diffusion.schedule import (
    LOGSNR_MAX,
    LOGSNR_MIN,
    alpha_sigma,
    logsnr_schedule_cosine,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Mixture parameters: means [K, D], stds [K, D] (diagonal), weights [K] summing to 1."""

    means: jax.Array
    stds: jax.Array
    weights: jax.Array

    @property
    def num_classes(self) -> int:
        """Number of components K; label K is the null (unconditional) class."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return self.means.shape[1]


def make_gmm(
    *, num_classes: int, dim: int, radius: float = 1.0, std: float = 0.15, seed: int = 0
) -> GaussianMixture:
    """Equal-weight mixture with means spread on a sphere of `radius`, isotropic `std`.

    Means are deterministic for a seed: random unit directions scaled by `radius` (in 2-D,
    evenly spaced angles), so components are well separated for small `std`.
    """
    if num_classes < 1 or dim < 1:
        raise ValueError(f"num_classes={num_classes} and dim={dim} must both be >= 1.")
    if std <= 0:
        raise ValueError(f"std={std} must be positive.")
    if dim == 2:
        angles = 2 * np.pi * np.arange(num_classes) / num_classes
        means = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:
        directions = np.random.default_rng(seed).normal(size=(num_classes, dim))
        means = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    return GaussianMixture(
        means=jnp.asarray(radius * means, jnp.float32),
        stds=jnp.full((num_classes, dim), std, jnp.float32),
        weights=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32),
    )


def _component_posteriors(
    gmm: GaussianMixture, z: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per component: E[x | z, k] [B, K, D] and log p(z | k) + log pi_k [B, K]."""
    a = alpha[:, None, None]
    s = sigma[:, None, None]
    var_z = a**2 * gmm.stds[None] ** 2 + s**2  # [B, K, D]
    resid = z[:, None, :] - a * gmm.means[None]  # [B, K, D]
    mean_x = gmm.means[None] + a * gmm.stds[None] ** 2 * resid / var_z
    log_lik = -0.5 * jnp.sum(resid**2 / var_z + jnp.log(2 * jnp.pi * var_z), axis=-1)
    return mean_x, log_lik + jnp.log(gmm.weights)[None]


def gmm_xhat(
    gmm: GaussianMixture,
    z: jax.Array,
    t: jax.Array,
    labels: jax.Array,
    *,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
) -> jax.Array:
    """Exact E[x | z_t, c] for labels c < K and E[x | z_t] for the null label K.

    Args:
      gmm: the mixture.
      z: [B, D] noisy data at time t.
      t: [B] or scalar time in [0, 1].
      labels: [B] int labels in [0, K]; K is the unconditional (null) class.
    """
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    logsnr = logsnr_schedule_cosine(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    return gmm_xhat_at_logsnr(gmm, z.astype(jnp.float32), logsnr, labels)


def gmm_xhat_at_logsnr(
    gmm: GaussianMixture, z: jax.Array, logsnr: jax.Array, labels: jax.Array
) -> jax.Array:
    """`gmm_xhat` at log-SNRs [B] instead of times, in z's float dtype (float64 with x64)."""
    alpha, sigma = alpha_sigma(jnp.asarray(logsnr, z.dtype))
    mean_x, log_post = _component_posteriors(gmm, z, alpha, sigma)
    posterior = jax.nn.softmax(log_post, axis=-1)  # p(k | z) [B, K]
    uncond = jnp.einsum("bk,bkd->bd", posterior, mean_x)
    k = gmm.num_classes
    cond = jnp.take_along_axis(mean_x, jnp.clip(labels, 0, k - 1)[:, None, None], axis=1)[:, 0]
    return jnp.where((labels >= k)[:, None], uncond, cond)


@dataclasses.dataclass(frozen=True)
class _GmmDenoiser:
    """The static half of the exact denoiser's Partial: the schedule bounds, hashed by value."""

    logsnr_min: float
    logsnr_max: float

    def __call__(self, gmm: GaussianMixture, z, t, labels, w=None):
        del w  # the exact conditional denoiser is unguided; guidance wraps it
        return gmm_xhat(gmm, z, t, labels, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)


def make_gmm_denoise_fn(
    gmm: GaussianMixture, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX
) -> jax.tree_util.Partial:
    """The exact denoiser as a denoise_fn(z, t, labels, w=None) -> xhat Partial.

    The mixture is the Partial's bound (traced) argument, so the same compiled sampler or loss
    serves any mixture; w is ignored (wrap it with `guidance.make_guided_denoise_fn`).
    """
    return jax.tree_util.Partial(_GmmDenoiser(float(logsnr_min), float(logsnr_max)), gmm)
