"""SD3's MMDiT (diffusers' SD3Transformer2DModel) in Flax, and its packed text condition.

A text run's condition is one array [B, L, D] (`text_encoder.TextConditioner`). SD3 conditions
on two things: the joint token states [B, L_text, joint_attention_dim] (CLIP-L and CLIP-G's
penultimate states side by side, zero-padded to T5's width, then T5's states after them along
the sequence) and the pooled vector [B, pooled_projection_dim] (both CLIPs' projected pooled
outputs side by side). `pack_condition` stores the pooled vector as one extra last row,
zero-padded to the row width; `unpack_condition` takes the two apart again. The row width is
max(joint_attention_dim, pooled_projection_dim).

`MMDiT` follows diffusers' SD3Transformer2DModel (SD3, and SD3.5 with qk_norm 'rms_norm' and
dual attention layers), submodule for submodule and under the same names, '.' before a list
index written '_' (transformer_blocks_3/attn/to_out_0), so its weights load by name
(`distill_jax.interop.sd3`):
- pos_embed: a p x p convolution with stride p (`pos_embed/proj`), plus a 2-D sine-cosine
  positional embedding cropped from the centre of a pos_embed_max_size^2 table, positions at
  patch index / (pos_embed_max_size / (sample_size // p)). The table is recomputed, never a
  parameter: diffusers saves it (`pos_embed.pos_embed`, 906 MB in float32 for SD3.5-medium),
  and the reader checks the stored one against the recomputation and drops it;
- conditioning temb: Timesteps(256, cos first, frequency shift 0) of diffusers' timestep
  (sigma * 1000) through Dense -> SiLU -> Dense, plus the pooled text through Dense -> SiLU ->
  Dense (`time_text_embed`); the text tokens go through `context_embedder`;
- num_layers joint blocks (`JointBlock`): image and text streams, each adaLN-Zero modulated,
  one attention over both; SD3.5's dual-attention blocks add an image-only attention (attn2);
  the last block only reads the text stream (context_pre_only);
- output: `norm_out` (AdaLayerNormContinuous: scale, then shift), then `proj_out` (the output
  layer, `OUTPUT_LAYER`: kernel [width, p * p * out_channels], its last axis (p, q, channel)),
  then unpatchify to [B, H, W, out_channels].
As in DiT, the modulation layers and proj_out start at zero (a fresh MMDiT outputs 0). A student
(`use_guidance`) adds the guidance branch (`GUIDANCE_BRANCH`, zero-initialised last layer) to
temb, so it starts as its teacher. `on_timesteps` takes diffusers' timestep; not implemented:
diffusers' skip_layers, ControlNet residuals, IP-adapter inputs and forward chunking.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_schedule_cosine
from distill_jax.models.embeddings import GUIDANCE_BRANCH, GuidanceEmbedding, network_timestep
from distill_jax.models.mmdit_blocks import (
    OUTPUT_LAYER,
    AdaNorm,
    JointBlock,
    PatchEmbed,
    TimeTextEmbedding,
    modulate,
)
from distill_jax.models.remat import rematted

_ZERO = nn.initializers.zeros  # adaLN-Zero: the output layer starts at zero

Dtype = Any


def condition_width(joint_attention_dim: int, pooled_projection_dim: int) -> int:
    """The width D of a packed SD3 condition."""
    return max(int(joint_attention_dim), int(pooled_projection_dim))


def pack_condition(states, pooled):
    """[B, L_text, J] token states and [B, P] pooled -> [B, L_text + 1, max(J, P)].

    Works on numpy and jax arrays alike (returns the type of `states`' module).
    """
    xp = jnp if isinstance(states, jax.Array) else np
    width = condition_width(states.shape[-1], pooled.shape[-1])
    states = xp.pad(states, ((0, 0), (0, 0), (0, width - states.shape[-1])))
    pooled = xp.pad(pooled, ((0, 0), (0, width - pooled.shape[-1])))
    return xp.concatenate([states, pooled[:, None, :].astype(states.dtype)], axis=1)


def unpack_condition(condition, joint_attention_dim: int, pooled_projection_dim: int):
    """The inverse of `pack_condition`: (states [B, L_text, J], pooled [B, P])."""
    states = condition[:, :-1, : int(joint_attention_dim)]
    pooled = condition[:, -1, : int(pooled_projection_dim)]
    return states, pooled


class MMDiT(nn.Module):
    """SD3's MMDiT: (z [B, H, W, C], timestep [B], states, pooled, w) -> [B, H, W, out_channels].

    Attributes:
      sample_size: the latent side the model was trained at (only its patch grid, the
        positional embedding's base size, matters here).
      patch_size: p; H and W must be multiples of it.
      in_channels, out_channels: latent channels in and out.
      num_layers: joint blocks; the last one is context-pre-only.
      attention_head_dim, num_attention_heads: the width is their product.
      joint_attention_dim: the width of the text token states (context_embedder's input).
      caption_projection_dim: the text stream's width; equal to the width (diffusers needs it).
      pooled_projection_dim: the width of the pooled text vector.
      pos_embed_max_size: the side of the positional table a grid is cropped from.
      dual_attention_layers: the blocks with SD3.5's second (image-only) attention.
      qk_norm: None (SD3) or 'rms_norm' (SD3.5).
      use_guidance, guidance_fourier_dim: the student's w branch.
      attention: the attention implementation (`distill_jax.attention`).
      remat: each block's rematerialisation policy (`models.remat`).
      dtype: compute dtype; parameters stay float32.
    """

    sample_size: int
    patch_size: int
    in_channels: int
    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    out_channels: int
    pos_embed_max_size: int
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    use_guidance: bool = False
    guidance_fourier_dim: int = 32
    attention: str = "xla"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    # What every network of `models.kinds` carries: the time input's schedule (a flow
    # teacher's num_train_timesteps, or a discrete one's lambda_k), the output's
    # parameterisation, and the run's log-SNR range.
    flow_timesteps: int = 0
    timestep_logsnrs: tuple[float, ...] = ()
    parameterisation: str = "flow"
    logsnr_min: float = LOGSNR_MIN
    logsnr_max: float = LOGSNR_MAX
    both_shift: float = 0.0

    @property
    def text_dim(self) -> int:
        """The width of the packed condition (`pack_condition`) this network takes."""
        return condition_width(self.joint_attention_dim, self.pooled_projection_dim)

    def __call__(self, z, t, condition, w=None, train: bool = False) -> jax.Array:
        """The prediction [B, H, W, out_channels] at times t [B] in [0, 1].

        `condition` [B, L + 1, text_dim] is the packed text condition; t becomes the log-SNR
        of the run's cosine schedule, then the network's timestep (`network_timestep`: for a
        flow teacher num_train_timesteps * s, as the SD3 pipeline passes sigma * 1000).
        """
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        logsnr = logsnr_schedule_cosine(t, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)
        timestep = network_timestep(
            logsnr, timestep_logsnrs=self.timestep_logsnrs, flow_timesteps=self.flow_timesteps
        )
        states, pooled = unpack_condition(
            condition, self.joint_attention_dim, self.pooled_projection_dim
        )
        return self.on_timesteps(z, timestep, states, pooled, w, train)

    @property
    def hidden(self) -> int:
        """The token width, num_attention_heads * attention_head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    def _conditioning(self, timestep, pooled, w) -> jax.Array:
        """temb [B, hidden]: time and pooled text, plus a student's w branch."""
        batch = pooled.shape[0]
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        temb = TimeTextEmbedding(self.hidden, self.dtype, name="time_text_embed")(
            timestep, pooled.astype(self.dtype)
        )
        if self.use_guidance:
            temb = temb + GuidanceEmbedding(
                self.hidden, self.guidance_fourier_dim, dtype=self.dtype, name=GUIDANCE_BRANCH
            )(w, batch)
        return temb

    @nn.compact
    def on_timesteps(
        self,
        z: jax.Array,
        timestep: jax.Array,
        states: jax.Array,
        pooled: jax.Array,
        w: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """The prediction [B, H, W, out_channels] at diffusers' `timestep` [B] (sigma * 1000).

        states [B, L, joint_attention_dim] and pooled [B, pooled_projection_dim] as the SD3
        pipeline passes them (`unpack_condition`); w [B] only for a student. `train` is
        accepted for a common signature: SD3 has no dropout.
        """
        del train
        batch, height, width, _ = z.shape
        p = self.patch_size
        x = PatchEmbed(
            self.hidden,
            p,
            self.pos_embed_max_size,
            self.sample_size // p,
            self.dtype,
            name="pos_embed",
        )(z)
        temb = self._conditioning(timestep, pooled, w)
        context = nn.Dense(self.caption_projection_dim, dtype=self.dtype, name="context_embedder")(
            states.astype(self.dtype)
        )
        block = rematted(JointBlock, self.remat)
        for i in range(self.num_layers):
            x, context = block(
                self.hidden,
                self.num_attention_heads,
                self.qk_norm,
                i == self.num_layers - 1,
                i in self.dual_attention_layers,
                self.dtype,
                self.attention,
                name=f"transformer_blocks_{i}",
            )(x, context, temb)
        normed, (scale, shift) = AdaNorm(self.hidden, 2, self.dtype, name="norm_out")(x, temb)
        channels = self.out_channels
        x = nn.Dense(p * p * channels, kernel_init=_ZERO, dtype=self.dtype, name=OUTPUT_LAYER)(
            modulate(normed, shift, scale)
        )
        x = x.reshape(batch, height // p, width // p, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, height, width, channels).astype(jnp.float32)


def example_inputs(module: MMDiT, batch: int = 1) -> tuple:
    """Zero inputs of `on_timesteps` (one patch, one text token) to initialise `module`."""
    p = module.patch_size
    return (
        jnp.zeros((batch, p, p, module.in_channels)),
        jnp.zeros((batch,)),
        jnp.zeros((batch, 1, module.joint_attention_dim)),
        jnp.zeros((batch, module.pooled_projection_dim)),
        jnp.zeros((batch,)) if module.use_guidance else None,
    )


def init_params(module: MMDiT, rng: jax.Array):
    """Fresh parameters of `module` (a student's include its guidance branch)."""
    return module.init(rng, *example_inputs(module), method=MMDiT.on_timesteps)["params"]
