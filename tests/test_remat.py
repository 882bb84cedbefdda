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


# Each network's blocks under 'full'; every other policy on the DiT (the wrapping is the same
# function for every policy, and each compile of a gradient costs seconds here).
CASES = [("unet", "full"), ("sd_unet", "full"), ("dit", "full"), ("dit", "dots_saveable")]
CASES += [("dit", "offload")] if _offload_compiles() else []


@pytest.mark.parametrize("kind, policy", CASES)
def test_a_policy_gives_the_same_gradients_under_the_same_names(kind, policy):
    reference = named_leaves(_gradients(kind, "none"))
    got = named_leaves(_gradients(kind, policy))
    assert got.keys() == reference.keys()
    for name, leaf in reference.items():
        np.testing.assert_allclose(got[name], leaf, rtol=1e-5, atol=1e-7, err_msg=name)


def test_an_unknown_policy_is_refused_by_name():
    m, shape, _ = _network("dit")
    m.remat = "half"
    with pytest.raises(ValueError, match="config.model.remat='half' is unknown: accepted"):
        denoiser.build_model(m, data_shape=shape, num_classes=10, use_guidance=False)
