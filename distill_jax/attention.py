"""One attention function for every network, its implementation chosen by name.

`attention(q, k, v, bias=..., mask=..., implementation=...)` is softmax(q k^T / sqrt(D) + bias)
v over q [B, Q, H, D] and k, v [B, K, H, D], with the logits and the softmax in float32 and
the result in v's dtype. The U-Net, the SD U-Net, the DiT, the KL VAE and the text encoders
all call it; `config.model.attention` picks the implementation of the diffusion networks.

Implementations (`IMPLEMENTATIONS`):
- 'plain': the formula as written (einsum, float32 softmax, einsum). It holds the logits, 4
  bytes x B x H x Q x K: 512 MiB per image and head-group at 4,096 tokens (SD at 512x512).
  The reference the others are tested against.
- 'xla': `jax.nn.dot_product_attention(implementation='xla')`, XLA's own lowering of the same
  formula. The default: any backend.
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused flash
  attention on NVIDIA GPUs (float16 or bfloat16 inputs; head width a multiple of 8). It never
  holds the logits. Not available on a CPU or a TPU.
- 'splash': the Pallas TPU splash (sparse flash) attention kernel of jax.experimental.pallas,
  as maxtext and maxdiffusion use it; it never holds the logits. Its blocks are 128 wide, so
  queries, keys and the head width are zero-padded to multiples of 128 and the padded keys
  masked out by segment ids (which also carry a key-padding `mask`, [B, 1, 1, K]; no `bias`).
  Compiled for a TPU (a run, or `plan --topology` ahead of time) it is the Mosaic kernel; on
  any other backend the same kernel runs in Pallas' interpret mode (correct, slow: for tests).
  Inside a jit that has a mesh set (`jax.set_mesh`) the batch is split over the mesh's axes
  with `jax.shard_map`, the kernel running per device, as GSPMD cannot split a Mosaic call.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "plain", "cudnn", "splash")
LANES = 128  # the splash kernel's block granularity (TPU vector lanes)


def check_implementation(implementation: str) -> str:
    """`implementation` if it is one of IMPLEMENTATIONS; ValueError naming them otherwise."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"config.model.attention={implementation!r} is unknown: accepted "
            f"{', '.join(map(repr, IMPLEMENTATIONS))}."
        )
    return implementation


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """softmax(q k^T / sqrt(D) + bias, where mask) v: [B, Q, H, D] from k, v [B, K, H, D].

    Args:
      q, k, v: queries, keys and values, heads on the third axis.
      bias: added to the float32 logits, broadcastable to [B, H, Q, K] (e.g. a causal bias).
      mask: True where a query may attend a key, broadcastable to [B, H, Q, K].
      implementation: one of IMPLEMENTATIONS.
    """
    check_implementation(implementation)
    if implementation == "splash":
        return _splash(q, k, v, bias=bias, mask=mask)
    if implementation == "plain":
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    dtype = v.dtype
    if bias is not None:
        bias = bias.astype(dtype)
    out = jax.nn.dot_product_attention(
        q.astype(dtype), k.astype(dtype), v, bias=bias, mask=mask, implementation=implementation
    )
    return out.astype(dtype)


def _round_up(n: int) -> int:
    return -(-n // LANES) * LANES


def _block(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
    return next(b for b in (512, 256, LANES) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bk = _block(q_len), _block(kv_len)
    blocks = sk.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len))] * heads)
    with jax.ensure_compile_time_eval():  # its mask tables: constants, not a trace's values
        kernel = sk.make_splash_mha(
            mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret
        )
    return jax.vmap(kernel), sk.SegmentIds


def _key_mask(mask: jax.Array | None, batch: int, keys: int) -> jax.Array:
    """[B, K] booleans of a key-padding mask ([B, 1, 1, K]; all True for None).

    ValueError for a mask that varies over heads or queries.
    """
    if mask is None:
        return jnp.ones((batch, keys), bool)
    mask = jnp.asarray(mask)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(
            f"attention implementation 'splash' takes a key-padding mask of shape [B, 1, 1, K];"
            f" got {tuple(mask.shape)}: use 'xla' for masks over heads or queries."
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (batch, keys))


def _splash(q, k, v, *, bias, mask) -> jax.Array:
    """The 'splash' implementation (module docstring)."""
    if bias is not None:
        raise ValueError(
            "attention implementation 'splash' takes no bias: use 'xla' for biased attention."
        )
    (batch, q_len, heads, dim), kv_len = q.shape, k.shape[1]
    qp, kp, dp = _round_up(q_len), _round_up(kv_len), _round_up(dim)
    keys = jnp.pad(_key_mask(mask, batch, kv_len), ((0, 0), (0, kp - kv_len)))

    def heads_first(x, length):  # [B, L, H, D] -> [B, H, Lp, Dp], zero-padded
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dp - dim)))
        return x.transpose(0, 2, 1, 3)

    scale = jnp.asarray(1.0 / math.sqrt(dim), q.dtype)
    args = (heads_first(q * scale, qp), heads_first(k, kp), heads_first(v.astype(q.dtype), kp))
    q_ids, kv_ids = jnp.ones((batch, qp), jnp.int32), keys.astype(jnp.int32)

    def run(interpret, q, k, v, q_ids, kv_ids):
        kernel, segment_ids = _splash_kernel(heads, qp, kp, interpret)
        return kernel(q, k, v, segment_ids(q_ids, kv_ids))

    def per_platform(q, k, v, q_ids, kv_ids):
        return jax.lax.platform_dependent(
            q,
            k,
            v,
            q_ids,
            kv_ids,
            tpu=functools.partial(run, False),
            default=functools.partial(run, True),
        )

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.axis_names and batch % mesh.size == 0:
        spec = jax.sharding.PartitionSpec(mesh.axis_names)
        per_platform = jax.shard_map(
            per_platform, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False
        )
    out = per_platform(*args, q_ids, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :dim].astype(v.dtype)
