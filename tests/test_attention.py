"""distill_jax.attention: every implementation computes the formula, in every network.

'xla' against the formula written out ('plain') with a bias and a mask, in float32 and
bfloat16; then the text U-Net, the DiT and the SD U-Net built with each implementation give the
same predictions from the same (perturbed) weights. 'cudnn' needs an NVIDIA GPU: it is checked
only where one is present. 'splash' (the Pallas TPU kernel) runs here in Pallas' interpret
mode, and is compiled for a TPU slice that libtpu describes, split over its mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import attention as attention_lib
from distill_jax import config_checks
from distill_jax.config import base_config, load_config
from distill_jax.models import denoiser
from distill_jax.run import workdir

IMPLEMENTATIONS = [
    name
    for name in attention_lib.IMPLEMENTATIONS
    if name != "cudnn" or jax.devices()[0].platform == "gpu"
]


def _qkv(dtype, batch=2, queries=5, keys=7, heads=3, width=8):
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.normal(size=(batch, n, heads, width)), dtype) for n in (queries, keys, keys)
    )
    bias = jnp.asarray(rng.normal(size=(1, heads, queries, keys)), jnp.float32)
    mask = jnp.asarray(rng.random((batch, 1, 1, keys)) > 0.3).at[:, :, :, 0].set(True)
    return q, k, v, bias, mask


def _formula(q, k, v, bias, mask):
    """softmax(q k^T / sqrt(D) + bias, where mask) v in float64 numpy."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + np.asarray(bias)
    logits = np.where(np.asarray(mask), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_each_implementation_computes_the_formula(implementation, dtype, tolerance):
    q, k, v, bias, mask = _qkv(dtype)
    if implementation == "splash":  # key-padding masks only (refusals tested below)
        bias = jnp.zeros_like(bias[:, :1, :1])
        out = attention_lib.attention(q, k, v, mask=mask, implementation=implementation)
        np.testing.assert_allclose(
            np.asarray(out, np.float64), _formula(q, k, v, bias, mask), atol=tolerance
        )
        return
    out = attention_lib.attention(q, k, v, bias=bias, mask=mask, implementation=implementation)
    assert out.shape == q.shape and out.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float64), _formula(q, k, v, bias, mask), atol=tolerance
    )


def test_splash_gradients_are_the_formulas():
    # 200 queries and 7 keys: both padded to the kernel's 128-wide blocks, the head to 128.
    q, k, v, _, mask = _qkv(jnp.float32, queries=200)

    def loss(implementation):
        def f(q, k, v):
            out = attention_lib.attention(q, k, v, mask=mask, implementation=implementation)
            return jnp.sum(jnp.sin(out))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    for ours, plain in zip(loss("splash"), loss("plain"), strict=True):
        assert float(jnp.max(jnp.abs(plain))) > 1e-3
        np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), atol=2e-5)


def test_splash_refuses_a_bias_and_masks_it_cannot_carry():
    q, k, v, bias, mask = _qkv(jnp.float32)
    with pytest.raises(ValueError, match="'splash' takes no bias: use 'xla'"):
        attention_lib.attention(q, k, v, bias=bias, implementation="splash")
    causal = jnp.tril(jnp.ones((5, 7), bool))[None, None]
    with pytest.raises(ValueError, match=r"key-padding mask of shape \[B, 1, 1, K\]"):
        attention_lib.attention(q, k, v, mask=causal, implementation="splash")


def test_splash_compiles_to_the_tpu_kernel_split_over_the_slice():
    """Ahead of time for v5e-8 (libtpu, no TPU): a batch-sharded step of SD-sized attention
    (4,096 tokens of 8 heads of 64) is the Mosaic kernel per chip, and its temporaries are a
    fraction of XLA's, which holds the logits."""
    from jax.sharding import NamedSharding, PartitionSpec

    from distill_jax import parallel, topologies

    devices = topologies.abstract_devices(topologies.topology("v5e-8"))
    mesh = parallel.make_mesh(devices=devices)
    sharded = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES))
    x = jax.ShapeDtypeStruct((16, 4096, 8, 64), jnp.bfloat16, sharding=sharded)
    temporaries = {}
    for implementation in ("xla", "splash"):

        def f(q, k, v, implementation=implementation):
            out = attention_lib.attention(q, k, v, implementation=implementation)
            return jnp.sum(jnp.square(out.astype(jnp.float32)))

        grad = jax.jit(parallel.traced_in_mesh(jax.grad(f, argnums=(0, 1, 2)), mesh))
        lowered = grad.lower(x, x, x)
        kernels = lowered.as_text().count("tpu_custom_call")
        assert kernels == (3 if implementation == "splash" else 0)  # forward, dq, dkv
        temporaries[implementation] = lowered.compile().memory_analysis().temp_size_in_bytes
    # Measured 1.50 GiB against 0.03 GiB per chip.
    assert temporaries["splash"] < temporaries["xla"] / 10, temporaries


def _perturbed(params, seed=1):
    """`params` moved by N(0, 0.05^2) noise (numpy: no compile per leaf shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: leaf + 0.05 * rng.standard_normal(leaf.shape), params)


def _network(kind: str) -> tuple[object, tuple, int]:
    """(config.model, data shape, text width) of a tiny network of `kind` with attention."""
    m = base_config().model
    m.update(channels=16, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, emb_dim=32)
    if kind == "unet":  # self-attention and masked cross-attention to text
        m.update(kind="unet", attn_resolutions=(4,))
        return m, (8, 8, 1), 12
    if kind == "dit":
        m.update(kind="dit", dit_hidden=32, dit_depth=2, dit_patch_size=2, guidance_head="none")
        return m, (8, 8, 1), 0
    m.update(kind="sd_unet", guidance_head="none")
    m.sd_unet.update(
        block_out_channels=(16, 32),
        cross_attention=(True, False),
        heads=(2, 2),
        transformer_layers=(1, 1),
        layers_per_block=1,
        norm_groups=8,
        cross_attention_dim=12,
    )
    return m, (8, 8, 1), 12


@pytest.mark.parametrize("kind", ["unet", "dit", "sd_unet"])
def test_networks_predict_the_same_with_every_implementation(kind):
    m, shape, text = _network(kind)
    batch = 2
    z = jax.random.normal(jax.random.key(2), (batch, *shape))
    t = jnp.array([0.3, 0.8])
    if text:
        labels = jax.random.normal(jax.random.key(3), (batch, 6, text))
        labels = labels.at[:, 4:].set(0.0)  # padding: masked by the U-Net's cross-attention
    else:
        labels = jnp.array([1, 10])
    outputs, params = {}, None
    # 'splash' (interpreted here, slowly) on the U-Net alone: self-attention and masked
    # cross-attention, the two calls every network makes.
    for implementation in [i for i in IMPLEMENTATIONS if i != "splash" or kind == "unet"]:
        m.attention = implementation
        model = denoiser.build_model(
            m, data_shape=shape, num_classes=10, use_guidance=False, text_dim=text
        )
        if params is None:
            params = _perturbed(denoiser.init_params(model, jax.random.key(0), data_shape=shape))
        apply = jax.jit(lambda p, m=model: m.apply({"params": p}, z, t, labels, None, train=False))
        outputs[implementation] = np.asarray(apply(params))
    reference = outputs["plain"]
    assert np.abs(reference).max() > 1e-3  # the attention layers are live
    for implementation, out in outputs.items():
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5, err_msg=implementation)


def test_the_implementation_is_a_checked_key_that_a_workdir_may_change():
    config = load_config("configs/digits.py:smoke")
    config.model.attention = "flash"
    with pytest.raises(ValueError, match="model.attention='flash'.*accepted one of"):
        config_checks.validate_config(config)
    old = base_config().to_dict()
    new = base_config()
    new.model.attention = "plain"
    assert workdir.config_differences(old, new.to_dict()) == {}
