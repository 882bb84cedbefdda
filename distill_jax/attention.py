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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "plain", "cudnn")


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
