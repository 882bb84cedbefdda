"""The exact Gaussian-mixture denoiser: limits at t = 0 and t = 1, and E[x | z] by Monte Carlo."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.data import sample_mixture
from distill_jax.diffusion import gmm as gmm_lib
from distill_jax.diffusion.schedule import q_sample


@pytest.fixture
def mixture():
    gmm = gmm_lib.make_gmm(num_classes=3, dim=3, radius=2.0, std=0.3, seed=1)
    # Unequal weights, so the null-label mean is not the plain average of the means.
    return gmm_lib.GaussianMixture(
        means=gmm.means, stds=gmm.stds, weights=jnp.array([0.5, 0.3, 0.2])
    )


def test_make_and_sample_shapes(mixture):
    x, labels = sample_mixture(mixture, num=7, seed=0)
    chex.assert_shape(x, (7, 3))
    chex.assert_type(labels, jnp.int32)
    assert mixture.num_classes == 3 and mixture.dim == 3
    with pytest.raises(ValueError, match="num_classes"):
        gmm_lib.make_gmm(num_classes=0, dim=2)


def test_t_zero_returns_z(mixture):
    x, labels = sample_mixture(mixture, num=16, seed=1)
    for lab in (labels, jnp.full_like(labels, mixture.num_classes)):
        got = gmm_lib.gmm_xhat(mixture, x, jnp.zeros(16), lab)
        np.testing.assert_allclose(got, x, atol=1e-3)


def test_t_one_returns_the_mean(mixture):
    z = jax.random.normal(jax.random.PRNGKey(2), (8, 3))
    labels = jnp.arange(8, dtype=jnp.int32) % 3
    got = gmm_lib.gmm_xhat(mixture, z, jnp.ones(8), labels)
    np.testing.assert_allclose(got, mixture.means[labels], atol=1e-3)
    null = jnp.full((8,), mixture.num_classes, jnp.int32)
    got = gmm_lib.gmm_xhat(mixture, z, jnp.ones(8), null)
    mixture_mean = jnp.sum(mixture.weights[:, None] * mixture.means, axis=0)
    np.testing.assert_allclose(got, jnp.broadcast_to(mixture_mean, (8, 3)), atol=1e-3)


@pytest.mark.parametrize("conditional", [True, False])
def test_posterior_mean_by_monte_carlo(mixture, conditional):
    # E[(x - E[x|z]) f(z)] = 0 for every f; check f = 1 and f = z at a mid-noise time.
    n = 40000
    _, ke = jax.random.split(jax.random.PRNGKey(3))
    x, labels = sample_mixture(mixture, num=n, seed=3)
    t = jnp.full((n,), 0.6)
    z = q_sample(x, t, jax.random.normal(ke, x.shape))
    query = labels if conditional else jnp.full_like(labels, mixture.num_classes)
    resid = np.asarray(x - gmm_lib.gmm_xhat(mixture, z, t, query), np.float64)
    feats = np.concatenate([np.ones((n, 1)), np.asarray(z, np.float64)], axis=1)
    moments = feats.T @ resid / n  # [1 + D, D]
    # Five standard errors of each sample moment.
    se = np.sqrt((feats**2).T @ resid**2 / n) / np.sqrt(n)
    assert np.all(np.abs(moments) < 5 * se + 1e-6), (moments, se)
    # The check has power: a wrong denoiser (the data mean, ignoring z) fails it.
    wrong = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(axis=0)
    assert np.any(np.abs(feats.T @ wrong / n) > 5 * se)
