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

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attention import attention
from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_schedule_cosine
from distill_jax.models.embeddings import GUIDANCE_BRANCH, GuidanceEmbedding, network_timestep
from distill_jax.models.remat import rematted

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


# ---------------------------------------------------------------------------------------------
# The transformer.

TIMESTEP_FEATURES = 256  # diffusers' CombinedTimestepTextProjEmbeddings: Timesteps(256)
LAYER_NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of SD3Transformer2DModel
OUTPUT_LAYER = "proj_out"  # kernel [hidden, p * p * out_channels], last axis (p, q, channel)
_ZERO = nn.initializers.zeros  # adaLN-Zero: modulation and output layers start at zero


def timestep_features(timestep: jax.Array) -> jax.Array:
    """diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) of [B] steps.

    Frequencies exp(-log(10000) i / 128), i = 0..127 (DiT's shift 1 divides by 127): cosines
    first, then sines, in float32 as diffusers computes them.
    """
    half = TIMESTEP_FEATURES // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timestep, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M, dim]: sin then cos of float64 positions times 1 / 10000^(i / (dim / 2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def position_table(dim: int, max_size: int, base_size: int) -> np.ndarray:
    """[max_size, dim / 2]: one axis' half of diffusers' pos_embed.pos_embed buffer.

    The buffer (get_2d_sincos_pos_embed of a max_size^2 grid, base size sample_size // p) holds
    at grid cell (row r, column c), row-major, the features [table[c], table[r]]. Positions are
    index / (max_size / base_size) in float32, as diffusers computes them.
    """
    positions = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)
    return _sincos_1d(dim // 2, positions)


def cropped_positional_embedding(
    dim: int, grid_h: int, grid_w: int, max_size: int, base_size: int
) -> np.ndarray:
    """PatchEmbed.cropped_pos_embed: the centre grid_h x grid_w of the table, [h * w, dim]."""
    if dim % 4:
        raise ValueError(f"the MMDiT width {dim} must be divisible by 4 (2-D sine-cosine).")
    if grid_h > max_size or grid_w > max_size:
        raise ValueError(
            f"a {grid_h}x{grid_w} patch grid exceeds pos_embed_max_size={max_size}: accepted "
            f"at most {max_size} patches a side."
        )
    table = position_table(dim, max_size, base_size)
    top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
    cols = np.broadcast_to(table[None, left : left + grid_w], (grid_h, grid_w, dim // 2))
    rows = np.broadcast_to(table[top : top + grid_h, None], (grid_h, grid_w, dim // 2))
    return np.concatenate([cols, rows], axis=-1).reshape(grid_h * grid_w, dim).astype(np.float32)


def _layer_norm(name: str) -> nn.LayerNorm:
    # Exact variance (not E[x^2] - E[x]^2), as DiT's: the residual stream has a large mean.
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        use_bias=False,
        use_scale=False,
        use_fast_variance=False,
        name=name,
    )


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """diffusers' PatchEmbed with pos_embed_max_size: p x p conv, plus the cropped sincos."""

    hidden: int
    patch_size: int
    max_size: int
    base_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """z [B, H, W, C] -> tokens [B, (H / p) * (W / p), hidden], row-major."""
        batch, height, width, _ = z.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"the patch size {p} must divide the latent size {height}x{width}.")
        x = nn.Conv(
            self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj"
        )(z.astype(self.dtype))
        grid_h, grid_w = height // p, width // p
        pos = cropped_positional_embedding(
            self.hidden, grid_h, grid_w, self.max_size, self.base_size
        )
        return x.reshape(batch, grid_h * grid_w, self.hidden) + jnp.asarray(pos, x.dtype)[None]


class TwoLayer(nn.Module):
    """Dense -> SiLU -> Dense (diffusers' TimestepEmbedding and PixArtAlphaTextProjection)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, F] -> [B, hidden]."""
        h = nn.Dense(self.hidden, dtype=self.dtype, name="linear_1")(x.astype(self.dtype))
        return nn.Dense(self.hidden, dtype=self.dtype, name="linear_2")(nn.silu(h))


class TimeTextEmbedding(nn.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings: time MLP plus pooled-text MLP."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        """timestep [B] (diffusers' units), pooled [B, P] -> temb [B, hidden]."""
        t = TwoLayer(self.hidden, self.dtype, name="timestep_embedder")(timestep_features(timestep))
        return t + TwoLayer(self.hidden, self.dtype, name="text_embedder")(pooled)


class AdaNorm(nn.Module):
    """An adaptive LayerNorm's two halves: LayerNorm(x) and `chunks` rows of Dense(SiLU(temb)).

    With 6 chunks diffusers' AdaLayerNormZero (shift, scale, gate of attention and MLP), 9 its
    SD35AdaLayerNormZeroX (a second attention's three added), 2 its AdaLayerNormContinuous
    (scale, then shift). The Dense is `linear`, as diffusers names it.
    """

    hidden: int
    chunks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """(LayerNorm(x) [B, T, hidden], the chunks, each [B, hidden])."""
        emb = nn.Dense(
            self.chunks * self.hidden, kernel_init=_ZERO, dtype=self.dtype, name="linear"
        )(nn.silu(temb))
        return _layer_norm("norm")(x), jnp.split(emb, self.chunks, axis=-1)


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation 'gelu-approximate'): Dense 4x, tanh GELU, Dense."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, hidden] -> [B, T, hidden]."""
        h = nn.Dense(4 * self.hidden, dtype=self.dtype, name="net_0_proj")(x)
        return nn.Dense(self.hidden, dtype=self.dtype, name="net_2")(nn.gelu(h, approximate=True))


class JointAttention(nn.Module):
    """diffusers' Attention under JointAttnProcessor2_0, on the image and the text stream.

    Image tokens project with to_q/k/v, text tokens with add_q/k/v_proj; with qk_norm
    'rms_norm' each stream's queries and keys are RMS-normalised per head (norm_q, norm_k,
    norm_added_q, norm_added_k). One softmax attention runs over the image tokens followed by
    the text tokens; the image part leaves through to_out_0, the text part through to_add_out
    (none when `context_pre_only`: the last block drops the text stream). Without a text
    stream (`context` None: SD3.5's attn2) it is self-attention over the image tokens.
    """

    hidden: int
    num_heads: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    def _heads(self, x: jax.Array, names: tuple[str, ...]) -> list[jax.Array]:
        batch, tokens, _ = x.shape
        q, k, v = (
            nn.Dense(self.hidden, dtype=self.dtype, name=name)(x).reshape(
                batch, tokens, self.num_heads, self.hidden // self.num_heads
            )
            for name in names[:3]
        )
        if self.qk_norm == "rms_norm":
            q, k = (
                nn.RMSNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)(a)
                for name, a in zip(names[3:], (q, k), strict=True)
            )
        return [q, k, v]

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, hidden], context [B, L, hidden] or None -> (x out, context out or None)."""
        batch, tokens, _ = x.shape
        qkv = self._heads(x, ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
        if context is not None:
            added = self._heads(
                context, ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
            )
            qkv = [jnp.concatenate(pair, axis=1) for pair in zip(qkv, added, strict=True)]
        out = attention(*qkv, implementation=self.attention)
        out = out.reshape(batch, out.shape[1], self.hidden)
        x_out = nn.Dense(self.hidden, dtype=self.dtype, name="to_out_0")(out[:, :tokens])
        if context is None or self.context_pre_only:
            return x_out, None
        return x_out, nn.Dense(self.hidden, dtype=self.dtype, name="to_add_out")(out[:, tokens:])


class JointBlock(nn.Module):
    """diffusers' JointTransformerBlock: the image and text streams, one joint attention.

    Each stream has adaLN-Zero modulation (norm1, norm1_context), the joint attention, then a
    modulated LayerNorm and a tanh-GELU MLP (ff, ff_context). `dual_attention` (SD3.5's
    SD35AdaLayerNormZeroX blocks) adds a self-attention of the image stream (attn2) on a second
    modulation of the same normalised tokens. `context_pre_only` (the last block): the text
    stream is only read, with AdaLayerNormContinuous, and not returned.
    """

    hidden: int
    num_heads: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    dual_attention: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    def _attention(self, name: str, context_pre_only: bool = False) -> JointAttention:
        return JointAttention(
            self.hidden,
            self.num_heads,
            self.qk_norm,
            context_pre_only,
            self.dtype,
            self.attention,
            name=name,
        )

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, hidden], context [B, L, hidden], temb [B, hidden] -> (x, context or None)."""
        normed, mods = AdaNorm(
            self.hidden, 9 if self.dual_attention else 6, self.dtype, name="norm1"
        )(x, temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        c_normed, c_mods = AdaNorm(
            self.hidden, 2 if self.context_pre_only else 6, self.dtype, name="norm1_context"
        )(context, temb)
        # AdaLayerNormContinuous chunks (scale, shift); AdaLayerNormZero (shift, scale, ...).
        c_scale, c_shift = c_mods if self.context_pre_only else c_mods[1::-1]
        attended, c_attended = self._attention("attn", self.context_pre_only)(
            _modulate(normed, shift_msa, scale_msa), _modulate(c_normed, c_shift, c_scale)
        )
        x = x + gate_msa[:, None] * attended
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            attended2, _ = self._attention("attn2")(_modulate(normed, shift_msa2, scale_msa2))
            x = x + gate_msa2[:, None] * attended2
        h = _modulate(_layer_norm("norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(self.hidden, self.dtype, name="ff")(h)
        if self.context_pre_only:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
        context = context + c_gate_msa[:, None] * c_attended
        h = _modulate(_layer_norm("norm2_context")(context), c_shift_mlp, c_scale_mlp)
        h = FeedForward(self.hidden, self.dtype, name="ff_context")(h)
        return x, context + c_gate_mlp[:, None] * h


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
            _modulate(normed, shift, scale)
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
