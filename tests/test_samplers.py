"""Samplers with the exact Gaussian denoiser: marginals, exact small-N laws, inpainting, SDEdit,
argument checks, and compile-once behaviour."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from distill_jax.data import sample_mixture
from distill_jax.diffusion import gmm as gmm_lib
from distill_jax.diffusion import samplers

MEAN = np.array([0.5, -1.0])
STD = np.array([0.4, 1.0])
N_SAMPLES = 20000
# Standard errors with n = 20000: mean std / 141, variance var * sqrt(2 / n) = 1 % of var.
SE_MEAN = STD / np.sqrt(N_SAMPLES)
SE_VAR_REL = np.sqrt(2.0 / N_SAMPLES)

SAMPLER_FNS = {
    "ddim": lambda fn, z, c, w, rng, **kw: samplers.ddim_sample(fn, z, c, w, rng=rng, **kw),
    "ancestral": samplers.ancestral_sample,
    "stochastic": samplers.stochastic_sample,
}


def gaussian():
    return gmm_lib.GaussianMixture(
        means=jnp.asarray(MEAN[None], jnp.float32),
        stds=jnp.asarray(STD[None], jnp.float32),
        weights=jnp.ones((1,), jnp.float32),
    )


def exact_denoise(gmm, z, t, labels, w):
    """denoise_fn contract over the exact mixture denoiser; ignores w."""
    return gmm_lib.gmm_xhat(gmm, z, t, labels)


def start(n=N_SAMPLES, seed=0):
    z = jax.random.normal(jax.random.PRNGKey(seed), (n, 2))
    return z, jnp.zeros((n,), jnp.int32), jnp.zeros((n,))


# An independent float64 model of each sampler on Gaussian data, written from the formulas of
# DESIGN.md: every step is affine in z (plus Gaussian noise), so the output law is Gaussian and
# its mean and variance per dimension propagate exactly.
def _schedule(t):
    b = np.arctan(np.exp(-10.0))
    a = np.arctan(np.exp(10.0)) - b
    logsnr = np.clip(-2 * np.log(np.tan(a * t + b)), -20.0, 20.0)
    return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def _denoiser(t):
    """xhat = c0 + c1 z per dimension."""
    alpha, sigma = _schedule(t)
    c1 = alpha * STD**2 / (alpha**2 * STD**2 + sigma**2)
    return MEAN - c1 * alpha * MEAN, c1


def _ddim_affine(t, s):
    """z_s = d0 + d1 z_t (xhat itself when s = 0)."""
    c0, c1 = _denoiser(t)
    if s == 0:
        return c0, c1
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _schedule(t), _schedule(s)
    ratio = sigma_s / sigma_t
    return (alpha_s - ratio * alpha_t) * c0, ratio + (alpha_s - ratio * alpha_t) * c1


def exact_law(sampler, steps):
    mean, var = np.zeros(2), np.ones(2)
    for i in range(steps, 0, -1):
        t, s = i / steps, (i - 1) / steps
        if sampler == "ddim" or s == 0:
            d0, d1 = _ddim_affine(t, s)
            mean, var = d0 + d1 * mean, d1**2 * var
        elif sampler == "ancestral":
            (alpha_t, sigma_t), (alpha_s, sigma_s) = _schedule(t), _schedule(s)
            a_ts = alpha_t / alpha_s
            var_ts = sigma_t**2 - a_ts**2 * sigma_s**2
            c0, c1 = _denoiser(t)
            cz, cx = a_ts * sigma_s**2 / sigma_t**2, alpha_s * var_ts / sigma_t**2
            mean = cz * mean + cx * (c0 + c1 * mean)
            var = (cz + cx * c1) ** 2 * var + var_ts * sigma_s**2 / sigma_t**2
        else:  # stochastic: DDIM to u = (i - 2) / N, forward noise to s
            u = (i - 2) / steps
            d0, d1 = _ddim_affine(t, u)
            mean, var = d0 + d1 * mean, d1**2 * var
            (alpha_s, sigma_s), (alpha_u, sigma_u) = _schedule(s), _schedule(u)
            a_su = alpha_s / alpha_u
            mean, var = a_su * mean, a_su**2 * var + sigma_s**2 - a_su**2 * sigma_u**2
    return mean, var


def assert_law(x, mean, var, bias_var_rel=0.0):
    """Mean within 5 SE; variance within 5 SE plus a stated relative discretisation bias;
    cross-covariance (zero for the diagonal data) within 5 SE."""
    x = np.asarray(x, np.float64)
    std = np.sqrt(var)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * std / np.sqrt(len(x)) + 1e-4)
    rel = np.abs(x.var(0) / var - 1)
    np.testing.assert_array_less(rel, 5 * SE_VAR_REL + bias_var_rel)
    corr = np.corrcoef(x.T)[0, 1]
    assert abs(corr) < 5 / np.sqrt(len(x)), corr


@pytest.mark.parametrize("sampler", list(SAMPLER_FNS))
def test_small_n_matches_the_exact_law(sampler):
    # With 3 steps the law is far from the data; only a correct implementation matches it.
    steps = 3
    mean, var = exact_law(sampler, steps)
    assert np.all(np.abs(var / STD**2 - 1) > 0.2)  # the check is not the data law
    z, labels, w = start()
    fn = Partial(exact_denoise, gaussian())
    x = SAMPLER_FNS[sampler](fn, z, labels, w, jax.random.PRNGKey(1), steps=steps)
    chex.assert_shape(x, (N_SAMPLES, 2))
    assert_law(x, mean, var)


@pytest.mark.parametrize("sampler", list(SAMPLER_FNS))
def test_many_steps_reproduce_the_data(sampler):
    steps = 256
    # Discretisation bias on the variance at this N, from the exact float64 law (<~5 %).
    _, var_n = exact_law(sampler, steps)
    bias = np.abs(var_n / STD**2 - 1).max()
    assert bias < 0.06
    z, labels, w = start(seed=2)
    fn = Partial(exact_denoise, gaussian())
    x = SAMPLER_FNS[sampler](fn, z, labels, w, jax.random.PRNGKey(3), steps=steps)
    assert_law(x, MEAN, STD**2, bias_var_rel=bias)


def test_ddim_error_shrinks_with_steps():
    z, labels, w = start()
    fn = Partial(exact_denoise, gaussian())
    errors = []
    for steps in (2, 32):
        x = np.asarray(samplers.ddim_sample(fn, z, labels, w, steps=steps), np.float64)
        errors.append(np.abs(np.cov(x.T) - np.diag(STD**2)).max())
    assert errors[1] < 0.25 * errors[0], errors


def test_ddim_step_formula_and_last_step():
    kx, kz = jax.random.split(jax.random.PRNGKey(0))
    xhat = jax.random.normal(kx, (3, 2, 2))
    z = jax.random.normal(kz, (3, 2, 2))
    t = jnp.array([0.9, 0.5, 0.3])
    s = jnp.array([0.4, 0.0, 0.1])
    got = samplers.ddim_step(xhat, z, t, s)
    np.testing.assert_array_equal(got[1], xhat[1])
    (a_t, s_t), (a_s, s_s) = _schedule(np.asarray(t, np.float64)), _schedule(np.asarray(s))
    expect = (
        a_s[:, None, None] * xhat
        + s_s[:, None, None] * (z - a_t[:, None, None] * xhat) / s_t[:, None, None]
    )
    np.testing.assert_allclose(
        np.asarray(got)[[0, 2]], np.asarray(expect)[[0, 2]], rtol=1e-5, atol=1e-6
    )


def test_one_step_returns_xhat_at_t_start():
    z, labels, w = start(n=8)
    fn = Partial(exact_denoise, gaussian())
    x = samplers.ddim_sample(fn, z, labels, w, steps=1)
    np.testing.assert_allclose(x, exact_denoise(gaussian(), z, jnp.ones(8), labels, w))


@pytest.mark.parametrize("sampler", list(SAMPLER_FNS))
def test_inpainting_keeps_known_pixels_and_follows_them(sampler):
    # Two well-separated clusters at (-1, -1) and (1, 1): knowing x_0 fixes the cluster, so
    # the inpainted x_1 should take its sign. Replacement-based inpainting only approximates
    # p(x_1 | x_0) (a sampler that ignored `known` would agree half the time), hence 0.85.
    gmm = gmm_lib.GaussianMixture(
        means=jnp.array([[-1.0, -1.0], [1.0, 1.0]]),
        stds=jnp.full((2, 2), 0.2),
        weights=jnp.array([0.5, 0.5]),
    )
    n = 512
    known_x0 = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)
    known = jnp.stack([known_x0, jnp.full((n,), 7.0)], axis=1)  # x_1 of `known` is ignored
    mask = jnp.broadcast_to(jnp.array([1.0, 0.0]), (n, 2))
    z = jax.random.normal(jax.random.PRNGKey(4), (n, 2))
    null = jnp.full((n,), 2, jnp.int32)  # unconditional
    x = SAMPLER_FNS[sampler](
        Partial(exact_denoise, gmm),
        z,
        null,
        jnp.zeros(n),
        jax.random.PRNGKey(5),
        steps=32,
        known=known,
        mask=mask,
    )
    np.testing.assert_array_equal(x[:, 0], known[:, 0])
    agree = np.mean(np.sign(np.asarray(x[:, 1])) == np.sign(np.asarray(known_x0)))
    assert agree > 0.85, agree


def test_image_to_image_from_small_t_returns_the_input():
    x, _ = sample_mixture(gaussian(), num=64, seed=6)
    z = samplers.noise_to(x, 1e-3, jax.random.PRNGKey(7))
    assert not np.array_equal(z, x)
    labels, w = jnp.zeros((64,), jnp.int32), jnp.zeros(64)
    fn = Partial(exact_denoise, gaussian())
    for name, sample in SAMPLER_FNS.items():
        out = sample(fn, z, labels, w, jax.random.PRNGKey(8), steps=4, t_start=1e-3)
        np.testing.assert_allclose(out, x, atol=1e-2, err_msg=name)
    # From t_start = 1 the input is forgotten.
    z = samplers.noise_to(x, 1.0, jax.random.PRNGKey(7))
    out = samplers.ddim_sample(fn, z, labels, w, steps=4, t_start=1.0)
    assert np.abs(np.asarray(out - x)).max() > 0.1


@pytest.mark.parametrize("t_start", [0.0, -0.5, 1.5])
def test_bad_t_start_is_an_error(t_start):
    z, labels, w = start(n=4)
    with pytest.raises(ValueError, match=r"t_start=.*\(0, 1\]"):
        samplers.ddim_sample(exact_denoise, z, labels, w, steps=2, t_start=t_start)
    with pytest.raises(ValueError, match="t_start"):
        samplers.noise_to(z, t_start, jax.random.PRNGKey(0))


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps_is_an_error(steps):
    z, labels, w = start(n=4)
    for sample in SAMPLER_FNS.values():
        with pytest.raises(ValueError, match="steps=.*integer >= 1"):
            sample(exact_denoise, z, labels, w, jax.random.PRNGKey(0), steps=steps)


def test_bad_inpainting_and_rng_arguments():
    z, labels, w = start(n=4)
    fn = Partial(exact_denoise, gaussian())
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="known and mask"):
        samplers.ddim_sample(fn, z, labels, w, steps=2, known=z, rng=key)
    with pytest.raises(ValueError, match="mask shape"):
        samplers.ddim_sample(fn, z, labels, w, steps=2, known=z, mask=z[:, :1], rng=key)
    with pytest.raises(ValueError, match="rng"):
        samplers.ddim_sample(fn, z, labels, w, steps=2, known=z, mask=jnp.ones_like(z))
    with pytest.raises(ValueError, match="rng"):
        samplers.ancestral_sample(fn, z, labels, w, None, steps=2)


@pytest.mark.parametrize("sampler", list(SAMPLER_FNS))
def test_compiles_once_per_step_count(sampler):
    traces = []

    def apply_fn(params, z, t, labels, w):
        traces.append(1)  # runs once per trace, never at run time
        return params["scale"] * z + params["shift"]

    sample = functools.partial(SAMPLER_FNS[sampler], rng=jax.random.PRNGKey(0))
    labels, w = jnp.zeros((3,), jnp.int32), jnp.zeros(3)
    outs = []
    for seed, scale in ((0, 0.5), (1, 0.9)):
        params = {"scale": jnp.float32(scale), "shift": jnp.zeros(2)}
        z = jax.random.normal(jax.random.PRNGKey(seed), (3, 2))
        outs.append(sample(Partial(apply_fn, params), z, labels, w, steps=4))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])  # the new parameters were used
    sample(Partial(apply_fn, params), z, labels, w, steps=5)
    assert len(traces) == 2
    # A plain function is cached by identity too.
    plain = functools.partial(apply_fn, params)
    before = len(traces)
    sample(plain, z, labels, w, steps=4)
    sample(plain, z + 1, labels, w, steps=4)
    assert len(traces) == before + 1
