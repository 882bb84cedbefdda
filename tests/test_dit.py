"""model.kind='dit' as a network of the project: built from config, trainable, shardable."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import config as config_lib
from distill_jax import parallel
from distill_jax.interop import dit as reader
from distill_jax.models import denoiser
from distill_jax.training import teacher as teacher_lib

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")


def _model_config(**overrides):
    model = config_lib.base_config().model
    model.update(dict(kind="dit", dit_hidden=32, dit_depth=2, num_heads=2, dropout=0.0))
    model.update(overrides)
    return model


def test_fresh_dit_outputs_zero_and_trains():
    """adaLN-Zero: a fresh DiT's output is exactly 0; the teacher loss then falls."""
    diffusion = config_lib.base_config().diffusion
    model = denoiser.build_model(
        _model_config(parameterisation="v"),
        data_shape=(8, 8, 1),
        num_classes=10,
        use_guidance=False,
    )
    params = denoiser.init_params(model, jax.random.PRNGKey(0), data_shape=(8, 8, 1))
    z = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    assert not np.any(model.apply({"params": params}, z, jnp.full(4, 0.5), jnp.arange(4)))
    loss_fn = teacher_lib.make_teacher_loss(model, null_condition=10, diffusion=diffusion)
    # A fixed batch of 16 smooth images, one per label (learnable in a few dozen steps).
    grid = jnp.linspace(-1, 1, 8)
    x = jnp.stack([jnp.sin((k + 1) * grid)[:, None] * jnp.cos(grid)[None] for k in range(16)])
    batch = {"x": x[..., None], "condition": jnp.arange(16) % 10}
    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, key):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key, None)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    keys = jax.random.split(jax.random.PRNGKey(2), 150)
    losses = []
    for key in keys:
        params, state, loss = step(params, state, key)
        losses.append(float(loss))
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:10])


def test_dit_xl2_kernels_shard_over_fsdp():
    """The FSDP rule (largest axis divisible by the fsdp size) splits every DiT-XL/2 matrix."""
    with open(os.path.join(DATA, "dit_xl2_manifest.json")) as f:
        manifest = json.load(f)
    keys = reader.dit_model_config(dict(manifest["config"], _class_name="Transformer2DModel"))
    abstract = reader.abstract_dit_params(keys, (32, 32, 4), 1000)
    leaves = jax.tree.leaves(abstract)
    matrices = [leaf.shape for leaf in leaves if len(leaf.shape) >= 2]
    assert len(matrices) == 28 * 10 + 3
    for shape in matrices:
        assert parallel.fsdp_spec(shape, 8) != jax.sharding.PartitionSpec(), shape


@pytest.mark.parametrize(
    "overrides, data_shape, text_dim, match",
    [
        (dict(num_heads=3), (8, 8, 1), 0, "multiple of config.model.num_heads"),
        (dict(dit_patch_size=3), (8, 8, 1), 0, "must divide the image size"),
        (dict(guidance_head="affine"), (8, 8, 1), 0, "accepted 'none'"),
        ({}, (8, 8, 1), 384, "class labels only"),
        ({}, (64,), 0, r"needs data_shape \(H, W, C\)"),
    ],
)
def test_bad_dit_configs_refused(overrides, data_shape, text_dim, match):
    with pytest.raises(ValueError, match=match):
        denoiser.build_model(
            _model_config(**overrides),
            data_shape=data_shape,
            num_classes=10,
            use_guidance=False,
            text_dim=text_dim,
        )
