"""models.norm.GroupNorm: Flax's math, accurate for activations with large means."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.config import base_config
from distill_jax.models import build_model, init_params
from distill_jax.models import unet as unet_module
from distill_jax.models.norm import GroupNorm
from distill_jax.training import state as state_lib
from distill_jax.training.teacher import make_teacher_loss


def reference(x, scale, bias, groups, epsilon=1e-6):
    """Textbook GroupNorm in float64: two passes, then the affine."""
    x = np.asarray(x, np.float64)
    g = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = np.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = (g - mean) / np.sqrt(var + epsilon)
    y = y * np.asarray(scale, np.float64).reshape(groups, -1) + np.asarray(bias).reshape(groups, -1)
    return y.reshape(x.shape)


@pytest.mark.parametrize(
    "shape, groups", [((4, 8, 8, 32), 32), ((3, 4, 4, 64), 8), ((2, 6, 6, 12), 3), ((5, 16, 24), 4)]
)
@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (1e4, 100.0), (-3.0, 1e-3)])
def test_group_norm_equals_a_float64_reference(shape, groups, offset, spread):
    keys = jax.random.split(jax.random.key(0), 3)
    x = offset + spread * jax.random.normal(keys[0], shape)
    scale = 1.0 + 0.5 * jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    params = {"params": {"scale": scale, "bias": bias}}
    y = jax.jit(GroupNorm(groups).apply)(params, x)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    # Float32 rounding of O(1) outputs, plus a few of the input's ulps relative to its spread
    # (1e-5 at a mean of 1e4 and a spread of 100): there E[x^2] - E[x]^2, Flax's default,
    # is off by 2e-3 to 7e-3.
    tolerance = 3e-5 + 2e-6 * abs(offset) / spread
    np.testing.assert_allclose(y, reference(x, scale, bias, groups), atol=tolerance, rtol=0)


def test_module_matches_flax_group_norm_in_parameters_outputs_and_gradients():
    x = 2.0 + 3.0 * jax.random.normal(jax.random.key(1), (4, 8, 8, 32))
    ours, flax_norm = GroupNorm(8), nn.GroupNorm(8)
    params = ours.init(jax.random.key(2), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, flax_norm.init(jax.random.key(2), x)
    )
    keys = jax.random.split(jax.random.key(3), 2)
    params = {
        "params": {
            "scale": 1 + jax.random.normal(keys[0], (32,)),
            "bias": params["params"]["bias"] + jax.random.normal(keys[1], (32,)),
        }
    }

    def loss(module, p, x):
        return jnp.sum(jnp.sin(module.apply(p, x)))

    for argnum in (1, 2):  # gradients for the parameters and for the input
        got = jax.grad(loss, argnum)(ours, params, x)
        want = jax.grad(loss, argnum)(flax_norm, params, x)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4), got, want)
    np.testing.assert_allclose(ours.apply(params, x), flax_norm.apply(params, x), atol=1e-5)
    x_half = x.astype(jnp.bfloat16)  # statistics in float32, output rounded to bfloat16
    half = GroupNorm(8, dtype=jnp.bfloat16).apply(params, x_half)
    assert half.dtype == jnp.bfloat16
    want = ours.apply(params, x_half.astype(jnp.float32))
    np.testing.assert_allclose(half.astype(jnp.float32), want, rtol=8e-3, atol=1e-2)


def _fixed_seed_losses(steps: int = 50) -> np.ndarray:
    config = base_config()
    config.model.update(channels=16, channel_mult=(1,), num_res_blocks=1, attn_resolutions=())
    model = build_model(config.model, data_shape=(8, 8, 1), num_classes=10, use_guidance=False)
    optimizer = state_lib.make_optimizer(config.teacher.optimizer, steps)
    params = init_params(model, jax.random.key(0), data_shape=(8, 8, 1))
    state = state_lib.create_state(params, optimizer, seed=0)
    loss_fn = make_teacher_loss(model, null_condition=10, diffusion=config.diffusion)
    step = jax.jit(state_lib.make_train_step(loss_fn, optimizer, ema_decay=0.99))
    keys = jax.random.split(jax.random.key(5), 2)
    batch = {
        "x": jax.random.uniform(keys[0], (32, 8, 8, 1), minval=-1, maxval=1),
        "condition": jax.random.randint(keys[1], (32,), 0, 10),
    }
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch, None)
        losses.append([metrics["loss"], metrics["grad_norm"]])
    return np.asarray(jax.device_get(losses))


def test_fixed_seed_run_has_the_same_losses_as_with_flax_group_norm(monkeypatch):
    ours = _fixed_seed_losses()
    monkeypatch.setattr(unet_module, "GroupNorm", nn.GroupNorm)  # Flax's default, E[x^2] - E[x]^2
    with_flax = _fixed_seed_losses()
    assert np.std(ours[:, 0]) > 1e-3  # the weights moved: 50 different losses
    np.testing.assert_allclose(ours, with_flax, rtol=2e-5)
