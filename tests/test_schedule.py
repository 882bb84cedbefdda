"""The clipped cosine log-SNR schedule, its inverse, and the forward transitions."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.diffusion import schedule


def reference_logsnr(t, lo=-20.0, hi=20.0):
    """The DESIGN formula in float64: -2 log tan(a t + b)."""
    b = np.arctan(np.exp(-hi / 2))
    a = np.arctan(np.exp(-lo / 2)) - b
    return -2.0 * np.log(np.tan(a * np.asarray(t, np.float64) + b))


def test_endpoints_and_reference_values():
    np.testing.assert_allclose(schedule.logsnr_schedule_cosine(0.0), 20.0, atol=1e-3)
    np.testing.assert_allclose(schedule.logsnr_schedule_cosine(1.0), -20.0, atol=1e-3)
    t = np.linspace(0.0, 1.0, 33)
    got = schedule.logsnr_schedule_cosine(t)
    chex.assert_shape(got, t.shape)
    np.testing.assert_allclose(got, reference_logsnr(t), atol=2e-3)
    # Custom clipping moves the endpoints.
    got = schedule.logsnr_schedule_cosine(jnp.array([0.0, 0.5, 1.0]), logsnr_min=-5, logsnr_max=7)
    np.testing.assert_allclose(got, reference_logsnr([0.0, 0.5, 1.0], -5, 7), atol=1e-4)
    np.testing.assert_allclose(np.asarray(got)[[0, 2]], [7.0, -5.0], atol=1e-4)


def test_strictly_decreasing():
    logsnr = np.asarray(schedule.logsnr_schedule_cosine(jnp.linspace(0.0, 1.0, 1001)))
    assert np.all(np.diff(logsnr) < 0)


def test_alpha_sigma_and_inverse():
    t = jnp.linspace(0.0, 1.0, 101)
    alpha, sigma = schedule.alpha_sigma_at(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    logsnr = schedule.logsnr_schedule_cosine(t)
    np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2), logsnr, atol=1e-3)
    inner = jnp.linspace(0.01, 0.99, 99)
    back = schedule.t_from_logsnr(schedule.logsnr_schedule_cosine(inner))
    np.testing.assert_allclose(back, inner, atol=1e-4)


def test_transition_identities():
    t = jnp.array([1.0, 0.9, 0.5, 0.3, 0.02, 0.5])
    s = jnp.array([0.0, 0.4, 0.25, 0.299, 0.01, 0.5])
    alpha_ts, sigma_ts = schedule.transition(t, s)
    alpha_t, sigma_t = schedule.alpha_sigma_at(t)
    alpha_s, sigma_s = schedule.alpha_sigma_at(s)
    np.testing.assert_allclose(alpha_ts, alpha_t / alpha_s, rtol=1e-5)
    np.testing.assert_allclose(sigma_ts**2, sigma_t**2 - alpha_ts**2 * sigma_s**2, atol=2e-6)
    # q(z_s | x) then q(z_t | z_s) has the moments of q(z_t | x).
    np.testing.assert_allclose(alpha_ts * alpha_s, alpha_t, rtol=1e-5)
    np.testing.assert_allclose(alpha_ts**2 * sigma_s**2 + sigma_ts**2, sigma_t**2, rtol=1e-5)
    # s == t is the identity transition.
    np.testing.assert_allclose(alpha_ts[-1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(sigma_ts[-1], 0.0, atol=1e-6)


def test_q_sample_and_expand_to():
    x = jnp.ones((2, 3, 4))
    eps = jnp.full((2, 3, 4), 2.0)
    t = jnp.array([0.2, 0.7])
    alpha, sigma = schedule.alpha_sigma_at(t)
    z = schedule.q_sample(x, t, eps)
    chex.assert_shape(z, (2, 3, 4))
    np.testing.assert_allclose(z[:, 0, 0], alpha + 2 * sigma, rtol=1e-6)
    chex.assert_shape(schedule.expand_to(t, x), (2, 1, 1))


@pytest.mark.parametrize("lo, hi", [(5.0, 1.0), (3.0, 3.0)])
def test_bad_logsnr_range_is_an_error(lo, hi):
    with pytest.raises(ValueError, match="logsnr_min"):
        schedule.logsnr_schedule_cosine(0.5, logsnr_min=lo, logsnr_max=hi)
    with pytest.raises(ValueError, match="logsnr_min"):
        schedule.t_from_logsnr(0.0, logsnr_min=lo, logsnr_max=hi)
