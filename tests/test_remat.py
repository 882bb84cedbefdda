"""models.remat: every policy gives the gradients of no rematerialisation, in every network.

The same tiny text U-Net, DiT and SD U-Net (tests/test_attention.py's) are differentiated with
each policy; the parameter names do not change, so checkpoints and imports are unaffected.
'offload' needs a pinned host memory space: it is checked where the backend has one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import _network, _perturbed

from distill_jax.models import denoiser, remat
from distill_jax.trees import named_leaves


@functools.cache
def _gradients(kind: str, policy: str):
    m, shape, text = _network(kind)
    m.remat = policy
    model = denoiser.build_model(
        m, data_shape=shape, num_classes=10, use_guidance=True, text_dim=text
    )
    params = _perturbed(denoiser.init_params(model, jax.random.key(0), data_shape=shape))
    z = jax.random.normal(jax.random.key(2), (2, *shape))
    labels = jax.random.normal(jax.random.key(3), (2, 6, text)) if text else jnp.array([1, 10])
    t, w = jnp.array([0.3, 0.8]), jnp.array([0.0, 2.0])

    def loss(p):
        out = model.apply({"params": p}, z, t, labels, w, train=False)
        return jnp.mean(out**2)

    return jax.jit(jax.grad(loss))(params)


@functools.cache
def _offload_compiles() -> bool:
    try:
        jax.jit(jax.grad(jax.checkpoint(jnp.sin, policy=remat.POLICIES["offload"]))).lower(
            1.0
        ).compile()
    except Exception:  # noqa: BLE001 - any refusal of the backend means no pinned host here
        return False
    return True


# Gradients are compared on the DiT under every policy (the wrapping is the same function for
# every policy); for the U-Nets, whose gradient compiles cost tens of seconds here, the traced
# gradient is checked to rematerialise their blocks (and not to without a policy).
CASES = ["full", "dots_saveable"] + (["offload"] if _offload_compiles() else [])


@pytest.mark.parametrize("policy", CASES)
def test_a_policy_gives_the_same_gradients_under_the_same_names(policy):
    reference = named_leaves(_gradients("dit", "none"))
    got = named_leaves(_gradients("dit", policy))
    assert got.keys() == reference.keys()
    for name, leaf in reference.items():
        np.testing.assert_allclose(got[name], leaf, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("kind", ["unet", "sd_unet"])
def test_the_unets_rematerialise_their_blocks(kind):
    def traced(policy):
        m, shape, text = _network(kind)
        m.remat = policy
        model = denoiser.build_model(
            m, data_shape=shape, num_classes=10, use_guidance=False, text_dim=text
        )
        params = jax.eval_shape(
            lambda: denoiser.init_params(model, jax.random.key(0), data_shape=shape)
        )
        z, t = jnp.zeros((1, *shape)), jnp.zeros((1,))
        labels = jnp.zeros((1, 3, text))

        def loss(p):
            return jnp.sum(model.apply({"params": p}, z, t, labels, None, train=False))

        return str(jax.make_jaxpr(jax.grad(loss))(params))

    assert "checkpoint" not in traced("none") and "remat" not in traced("none")
    rematted = traced("full")
    assert rematted.count("checkpoint") + rematted.count("remat") >= 4


def test_an_unknown_policy_is_refused_by_name():
    m, shape, _ = _network("dit")
    m.remat = "half"
    with pytest.raises(ValueError, match="config.model.remat='half' is unknown: accepted"):
        denoiser.build_model(m, data_shape=shape, num_classes=10, use_guidance=False)
