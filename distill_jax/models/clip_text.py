"""transformers' CLIPTextModel in Flax: the text encoder of SD 1.x / 2.x pipelines, and SD3's.

`ClipText` is CLIPTextModel (token states through final_layer_norm); `interop.text_encoder`
reads a pipeline's text_encoder/ into it; the BERT-family encoders are `text_encoder.MiniLM` at
their config's sizes. `ClipTextWithProjection` is CLIPTextModelWithProjection as SD3's
encode_prompt uses it (`interop.sd3_text`): a chosen hidden state without final_layer_norm, and
the projected pooled output. Both name their parameters alike (the projection adds
'text_projection'), so one tensor-name table serves both.
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
        states = _hidden_states(self.sizes, ids, mask, self.sizes.layers - self.skip)
        return nn.LayerNorm(self.sizes.eps, name="final_layer_norm")(states[-1])


class ClipTextWithProjection(nn.Module):
    """transformers' CLIPTextModelWithProjection as SD3's encode_prompt reads it.

    ids [B, L], mask [B, L] -> (hidden_states[-(skip + 2)] [B, L, width], text_embeds
    [B, projection]):
    - the states are the output of layer `sizes.layers - 1 - skip` (0 = the embeddings), NOT
      through final_layer_norm (skip = diffusers' clip_skip; 0 = its default, the penultimate);
    - text_embeds is text_projection (no bias) of final_layer_norm(last layer's output) at the
      end-token position: when eos_token_id is 2 (configs from before transformers PR #24773,
      e.g. SD3's) the position of the largest id, else the first position of eos_token_id (the
      first position when a row has none, as torch's argmax of all zeros).
    """

    sizes: EncoderSizes
    projection: int  # projection_dim
    eos_token_id: int
    skip: int = 0

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Causal, and attending only where mask [B, L] is 1 (SD3 passes no mask: all ones)."""
        states = _hidden_states(self.sizes, ids, mask, self.sizes.layers)
        last = nn.LayerNorm(self.sizes.eps, name="final_layer_norm")(states[-1])
        if self.eos_token_id == 2:
            position = jnp.argmax(ids, axis=-1)
        else:
            position = jnp.argmax(ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, position[:, None, None], axis=1)[:, 0]
        text_embeds = nn.Dense(self.projection, use_bias=False, name="text_projection")(pooled)
        return states[-(self.skip + 2)], text_embeds


def _hidden_states(sizes: EncoderSizes, ids: jax.Array, mask: jax.Array, layers: int) -> list:
    """[embeddings, layer 1's output, ..., layer `layers`' output] (transformers' hidden_states).

    Called inside a module's compact __call__: the submodules are that module's.
    """
    length = ids.shape[1]
    h = nn.Embed(sizes.vocab, sizes.width, name="token_embedding")(ids)
    h = h + nn.Embed(sizes.positions, sizes.width, name="position_embedding")(
        jnp.arange(length)[None, :]
    )
    causal = jnp.where(jnp.tri(length, dtype=bool), 0.0, jnp.finfo(jnp.float32).min)
    bias = jnp.minimum(causal[None, None], padding_bias(mask))
    states = [h]
    for i in range(layers):
        states.append(_ClipLayer(sizes, name=f"layer_{i}")(states[-1], bias))
    return states


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
