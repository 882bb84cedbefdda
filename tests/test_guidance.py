"""Classifier-free guidance: limits in w, one batched network call, Partial-based denoise_fn."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from distill_jax.diffusion import gmm as gmm_lib
from distill_jax.diffusion import guidance

K = 3


@pytest.fixture
def setup():
    gmm = gmm_lib.make_gmm(num_classes=K, dim=2, std=0.3)
    kz, kt = jax.random.split(jax.random.PRNGKey(0))
    z = jax.random.normal(kz, (5, 2))
    t = jax.random.uniform(kt, (5,), minval=0.2, maxval=0.9)
    labels = jnp.array([0, 1, 2, 0, 1], jnp.int32)
    return gmm, z, t, labels


def cond_gmm(gmm, z, t, labels):
    return gmm_lib.gmm_xhat(gmm, z, t, labels)


def test_limits_and_two_call_equivalence(setup):
    gmm, z, t, labels = setup
    cond_fn = Partial(cond_gmm, gmm)
    x_cond = cond_fn(z, t, labels)
    x_uncond = cond_fn(z, t, jnp.full_like(labels, K))
    assert not np.allclose(x_cond, x_uncond, atol=1e-3)  # otherwise the checks are vacuous
    for w_value, expect in ((0.0, x_cond), (-1.0, x_uncond)):
        got = guidance.guided_xhat(cond_fn, z, t, labels, jnp.full((5,), w_value), null_condition=K)
        np.testing.assert_allclose(got, expect, atol=1e-6)
    w = jnp.array([0.0, 0.5, 1.0, 2.0, 4.0])
    got = guidance.guided_xhat(cond_fn, z, t, labels, w, null_condition=K)
    expect = (1 + w)[:, None] * x_cond - w[:, None] * x_uncond
    chex.assert_shape(got, (5, 2))
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_cond_fn_called_once_on_a_doubled_batch(setup):
    gmm, z, t, labels = setup
    calls = []

    def counting_cond_fn(z2, t2, labels2):
        calls.append((z2.shape, np.asarray(labels2)))
        return cond_gmm(gmm, z2, t2, labels2)

    guidance.guided_xhat(counting_cond_fn, z, t, labels, jnp.ones(5), null_condition=K)
    assert len(calls) == 1
    shape, labels2 = calls[0]
    assert shape == (10, 2)
    np.testing.assert_array_equal(labels2, np.concatenate([labels, np.full(5, K)]))


def test_make_guided_denoise_fn_is_a_pytree_and_compiles_once(setup):
    gmm, z, t, labels = setup
    traces = []

    def apply_fn(params, z, t, labels):
        traces.append(1)
        return params["scale"] * cond_gmm(gmm, z, t, labels)

    w = jnp.full((5,), 2.0)

    @jax.jit
    def run(denoise_fn, z):
        return denoise_fn(z, t, labels, w)

    outputs = []
    for scale in (1.0, 3.0):
        fn = guidance.make_guided_denoise_fn(Partial(apply_fn, {"scale": scale}), null_condition=K)
        assert isinstance(fn, Partial)
        outputs.append(run(fn, z))
    assert len(traces) == 1  # new parameter values reuse the compiled function
    np.testing.assert_allclose(outputs[1], 3.0 * outputs[0], rtol=1e-5, atol=1e-6)
    expect = guidance.guided_xhat(Partial(cond_gmm, gmm), z, t, labels, w, null_condition=K)
    np.testing.assert_allclose(outputs[0], expect, atol=1e-6)
    # A plain callable works too.
    fn = guidance.make_guided_denoise_fn(lambda z, t, c: cond_gmm(gmm, z, t, c), null_condition=K)
    np.testing.assert_allclose(fn(z, t, labels, w), expect, atol=1e-6)


def test_as_partial_rejects_non_callables():
    with pytest.raises(TypeError, match="callable"):
        guidance.as_partial(3)
