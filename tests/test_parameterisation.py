"""Parameterisation conversions, "both", and the loss weights that tie them to x-MSE."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.diffusion import parameterisation as par
from distill_jax.diffusion import weighting
from distill_jax.diffusion.schedule import alpha_sigma


@pytest.fixture
def batch():
    kx, ke = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (6, 3, 2))
    eps = jax.random.normal(ke, (6, 3, 2))
    logsnr = jnp.linspace(-5.0, 5.0, 6)
    alpha, sigma = alpha_sigma(logsnr)
    z = alpha[:, None, None] * x + sigma[:, None, None] * eps
    return x, eps, z, logsnr


def test_round_trips(batch):
    x, eps, z, logsnr = batch
    v = par.v_from_x_eps(x, eps, logsnr)
    tol = dict(atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(par.x_from_eps(z, eps, logsnr), x, **tol)
    np.testing.assert_allclose(par.eps_from_x(z, x, logsnr), eps, **tol)
    np.testing.assert_allclose(par.x_from_v(z, v, logsnr), x, **tol)
    np.testing.assert_allclose(par.eps_from_v(z, v, logsnr), eps, **tol)
    # v agrees with its definition alpha eps - sigma x.
    alpha, sigma = alpha_sigma(logsnr)
    np.testing.assert_allclose(v, alpha[:, None, None] * eps - sigma[:, None, None] * x, **tol)


def test_xhat_from_output_every_parameterisation(batch):
    x, eps, z, logsnr = batch
    v = par.v_from_x_eps(x, eps, logsnr)
    outputs = {
        "x": x,
        "eps": eps,
        "v": v,
        "both": jnp.concatenate([x, eps], axis=-1),
        "flow": eps - x,  # the flow's velocity, for the same x and eps
    }
    assert set(outputs) == set(par.PARAMETERISATIONS)
    for name, output in outputs.items():
        got = par.xhat_from_output(output, z, logsnr, parameterisation=name)
        chex.assert_shape(got, x.shape)
        np.testing.assert_allclose(got, x, atol=2e-4, rtol=1e-4, err_msg=name)


def test_both_mixes_the_two_halves(batch):
    x, eps, z, logsnr = batch
    x_direct = x + 1.0  # disagree on purpose: the result must be the sigma^2 / alpha^2 mix
    got = par.xhat_from_output(
        jnp.concatenate([x_direct, eps], axis=-1), z, logsnr, parameterisation="both"
    )
    alpha, sigma = alpha_sigma(logsnr)
    expect = sigma[:, None, None] ** 2 * x_direct + alpha[:, None, None] ** 2 * x
    np.testing.assert_allclose(got, expect, atol=2e-4)


@pytest.mark.parametrize("shift", [-5.0, 2.0])
def test_both_shift_moves_where_the_halves_weigh_equally(batch, shift):
    x, eps, z, logsnr = batch
    x_direct = x + 1.0
    got = par.xhat_from_output(
        jnp.concatenate([x_direct, eps], axis=-1),
        z,
        logsnr,
        parameterisation="both",
        both_shift=shift,
    )
    w_direct = jax.nn.sigmoid(shift - logsnr)[:, None, None]
    np.testing.assert_allclose(got, w_direct * x_direct + (1 - w_direct) * x, atol=2e-4)
    # at lambda = shift the two halves weigh one half each
    at = jnp.full_like(logsnr, shift)
    half = par.xhat_from_output(
        jnp.concatenate([x_direct, eps], axis=-1), z, at, parameterisation="both", both_shift=shift
    )
    x_eps = par.x_from_eps(z, eps, at)
    np.testing.assert_allclose(half, 0.5 * x_direct + 0.5 * x_eps, rtol=1e-5, atol=1e-5)


def test_unknown_parameterisation_and_channels():
    with pytest.raises(ValueError, match="parameterisation='nope'.*eps, x, v, both"):
        par.check_parameterisation("nope")
    with pytest.raises(ValueError, match="parameterisation"):
        par.xhat_from_output(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.0, parameterisation="z")
    assert par.output_channels("both", 3) == 6
    assert par.output_channels("v", 3) == 3


def test_loss_weight_values():
    logsnr = jnp.array([-4.0, 0.0, 2.5])
    snr = np.exp(np.asarray(logsnr))
    expected = {
        "truncated_snr": np.maximum(snr, 1.0),
        "constant": np.ones(3),
        "snr": snr,
        "v_mse": 1.0 + snr,
    }
    assert set(expected) == set(weighting.WEIGHTINGS)
    for name, value in expected.items():
        np.testing.assert_allclose(weighting.loss_weight(logsnr, name=name), value, rtol=1e-6)
    # The default is the truncated SNR.
    np.testing.assert_allclose(weighting.loss_weight(logsnr), expected["truncated_snr"])
    assert np.isfinite(weighting.loss_weight(jnp.array(20.0))).all()


def test_weights_turn_x_mse_into_eps_and_v_mse(batch):
    x, eps, z, logsnr = batch
    xhat = x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
    eps_hat = par.eps_from_x(z, xhat, logsnr)
    v_hat = par.v_from_x_eps(xhat, eps_hat, logsnr)
    v = par.v_from_x_eps(x, eps, logsnr)

    def mse(a, b):
        return jnp.mean((a - b) ** 2, axis=(1, 2))

    got = weighting.weighted_mse(xhat, x, logsnr, weighting="snr")
    chex.assert_shape(got, (6,))
    np.testing.assert_allclose(got, mse(eps_hat, eps), rtol=2e-3)
    got = weighting.weighted_mse(xhat, x, logsnr, weighting="v_mse")
    np.testing.assert_allclose(got, mse(v_hat, v), rtol=2e-3)
    got = weighting.weighted_mse(xhat, x, logsnr, weighting="constant")
    np.testing.assert_allclose(got, mse(xhat, x), rtol=1e-6)


def test_unknown_weighting_is_an_error():
    with pytest.raises(ValueError, match="weighting='l1'.*truncated_snr"):
        weighting.loss_weight(jnp.zeros(2), name="l1")
    with pytest.raises(ValueError, match="weighting='l1'"):
        weighting.weighted_mse(jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.zeros(2), weighting="l1")
