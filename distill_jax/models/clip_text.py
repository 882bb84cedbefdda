"""transformers' CLIPTextModel in Flax: the text encoder of SD 1.x / 2.x pipelines.

`interop.text_encoder` reads a pipeline's text_encoder/ into it; the BERT-family encoders are
`text_encoder.MiniLM` at their config's sizes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.text_encoder import ACTIVATIONS, EncoderSizes, SelfAttention, padding_bias


class ClipText(nn.Module):
    """transformers' CLIPTextModel: ids [B, L], mask [B, L] -> token states [B, L, width].

    The states are final_layer_norm of layer `sizes.layers - skip`'s output (skip = diffusers'
    clip_skip; 0 = the last layer, = last_hidden_state).
    """

    sizes: EncoderSizes
    skip: int = 0

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Causal, and attending only where mask [B, L] is 1."""
        sizes, length = self.sizes, ids.shape[1]
        h = nn.Embed(sizes.vocab, sizes.width, name="token_embedding")(ids)
        h = h + nn.Embed(sizes.positions, sizes.width, name="position_embedding")(
            jnp.arange(length)[None, :]
        )
        causal = jnp.where(jnp.tri(length, dtype=bool), 0.0, jnp.finfo(jnp.float32).min)
        bias = jnp.minimum(causal[None, None], padding_bias(mask))
        for i in range(sizes.layers - self.skip):
            h = _ClipLayer(sizes, name=f"layer_{i}")(h, bias)
        return nn.LayerNorm(sizes.eps, name="final_layer_norm")(h)


class _ClipLayer(nn.Module):
    """One pre-LayerNorm CLIP layer."""

    sizes: EncoderSizes

    @nn.compact
    def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
        sizes = self.sizes
        h = h + SelfAttention(sizes.heads, name="self_attn")(
            nn.LayerNorm(sizes.eps, name="layer_norm1")(h), bias
        )
        mlp = nn.Dense(sizes.ffn, name="fc1")(nn.LayerNorm(sizes.eps, name="layer_norm2")(h))
        return h + nn.Dense(sizes.width, name="fc2")(ACTIVATIONS[sizes.activation](mlp))
