"""DiT (Peebles and Xie 2023): a class-conditional diffusion transformer with adaLN-Zero blocks.

The layout follows diffusers' `DiTTransformer2DModel` (and the older `Transformer2DModel` with
norm_type 'ada_norm_zero'), so its weights load by name (`distill_jax.interop.dit`):
- patchify: a p x p convolution with stride p, then fixed 2-D sine-cosine positional
  embeddings (recomputed, never stored, as diffusers does);
- conditioning: a timestep embedding (256 sinusoidal features, cos first, through
  Dense -> SiLU -> Dense) plus a class embedding with `num_classes + 1` rows, the last one
  the null class. diffusers gives every block its own copy of these embedders, and its final
  layer uses block 0's (`per_block_embedders=True`); the original DiT has one shared copy;
- blocks: LayerNorm (no affine) modulated by shift / scale / gate from Dense(SiLU(c)),
  self-attention, a tanh-GELU MLP (mlp_ratio 4);
- final layer: modulated LayerNorm, Dense to p * p * out channels, unpatchify. As in DiT, the
  modulation layers and the output layer start at zero (adaLN-Zero: a fresh DiT outputs 0). With
  `learned_sigma` the output has twice the data channels: the prediction, then the variance
  interpolation that DiT learns. The variance channels are carried (they load and train as
  weights) but `__call__` returns the prediction only; our samplers ignore the variance.

Time: `__call__` takes t in [0, 1] like every network here and turns it into the log-SNR of
the run's cosine schedule. A DiT trained here embeds 1000 * arctan(exp(-lambda / 2)) / (pi / 2)
as the U-Net does; an imported one (`timestep_logsnrs` set, the teacher's lambda_k) embeds the
fractional timestep k(lambda) of its discrete schedule (`diffusion.discrete`).

A student adds the guidance branch (`GUIDANCE_BRANCH`, zero-initialised last layer) to the
conditioning vector of every block and of the final layer, so it starts as its teacher.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attention import attention
from distill_jax.diffusion.parameterisation import output_channels
from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_schedule_cosine
from distill_jax.models.embeddings import (
    GUIDANCE_BRANCH,
    GuidanceEmbedding,
    network_timestep,
    sinusoidal_embedding,
)
from distill_jax.models.remat import rematted

Dtype = Any
TIMESTEP_FEATURES = 256  # diffusers' CombinedTimestepLabelEmbeddings: Timesteps(256)
# DiT's initialisation of the modulation and output layers (biases start at zero anyway).
_ZERO = nn.initializers.zeros


def timestep_features(timestep: jax.Array) -> jax.Array:
    """diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1) of [B] steps.

    Frequencies exp(-log(10000) i / 127), i = 0..127: cosines first, then sines.
    """
    sin_cos = sinusoidal_embedding(timestep, TIMESTEP_FEATURES, scale=1.0)
    half = TIMESTEP_FEATURES // 2
    return jnp.concatenate([sin_cos[:, half:], sin_cos[:, :half]], axis=-1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    angles = np.outer(positions.reshape(-1), 1.0 / 10000**omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def positional_embedding(
    dim: int, grid_h: int, grid_w: int, interpolation_scale: float = 1.0
) -> np.ndarray:
    """diffusers' get_2d_sincos_pos_embed for a grid_h x grid_w patch grid: [h * w, dim].

    Tokens run row-major over (row, column); the first half of the features encodes the
    column, the second half the row. Positions are patch indices / interpolation_scale
    (diffusers' base size equals the grid here).
    """
    if dim % 4:
        raise ValueError(f"the DiT width {dim} must be divisible by 4 (2-D sine-cosine).")
    rows, cols = np.meshgrid(
        np.arange(grid_h, dtype=np.float64) / interpolation_scale,
        np.arange(grid_w, dtype=np.float64) / interpolation_scale,
        indexing="ij",
    )
    return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)


class TimestepLabelEmbedding(nn.Module):
    """diffusers' CombinedTimestepLabelEmbeddings: Dense(SiLU(Dense(steps))) + class row."""

    hidden: int
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, labels: jax.Array) -> jax.Array:
        """Embed [B] timesteps and [B] int labels in [0, num_classes] -> [B, hidden]."""
        h = nn.Dense(self.hidden, dtype=self.dtype, name="time_linear_1")(
            timestep_features(timestep)
        )
        h = nn.Dense(self.hidden, dtype=self.dtype, name="time_linear_2")(nn.silu(h))
        table = nn.Embed(self.num_classes + 1, self.hidden, dtype=self.dtype, name="class_embed")
        return h + table(jnp.asarray(labels, jnp.int32))


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Exact variance (not E[x^2] - E[x]^2): the residual stream of a deep DiT has a large mean.
    return nn.LayerNorm(
        epsilon=eps, use_bias=False, use_scale=False, use_fast_variance=False, name=name
    )


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block on tokens [B, T, hidden] with conditioning [B, hidden]."""

    hidden: int
    num_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    attention_bias: bool = True
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # distill_jax.attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
        """x [B, T, hidden], cond [B, hidden] -> [B, T, hidden]."""
        dense = dict(dtype=self.dtype)
        # adaLN-Zero: the modulation starts at zero, so every block starts as the identity.
        modulation = nn.Dense(6 * self.hidden, kernel_init=_ZERO, name="ada_linear", **dense)(
            nn.silu(cond)
        )
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            modulation, 6, axis=-1
        )
        h = _modulate(_layer_norm(1e-6, "norm1")(x), shift_msa, scale_msa)
        batch, tokens, _ = h.shape
        head_dim = self.hidden // self.num_heads
        q, k, v = (
            nn.Dense(self.hidden, use_bias=self.attention_bias, name=name, **dense)(h).reshape(
                batch, tokens, self.num_heads, head_dim
            )
            for name in ("to_q", "to_k", "to_v")
        )
        attended = attention(q, k, v, implementation=self.attention)
        attended = attended.reshape(batch, tokens, self.hidden)
        attended = nn.Dense(self.hidden, name="to_out", **dense)(attended)
        attended = nn.Dropout(self.dropout, deterministic=not train)(attended)
        x = x + gate_msa[:, None] * attended
        h = _modulate(_layer_norm(self.norm_eps, "norm3")(x), shift_mlp, scale_mlp)
        h = nn.gelu(
            nn.Dense(self.mlp_ratio * self.hidden, name="ff_1", **dense)(h), approximate=True
        )
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Dense(self.hidden, name="ff_2", **dense)(h)
        return x + gate_mlp[:, None] * h


class DiT(nn.Module):
    """A DiT denoiser: (z [B, H, W, C], t [B], labels [B], w [B]) -> prediction [B, H, W, C].

    Attributes:
      hidden: token width (num_heads * head dim).
      depth: number of blocks.
      num_heads: attention heads.
      patch_size: p; H and W must be multiples of it.
      out_channels: the data channels C (the prediction has C, or 2C for 'both').
      learned_sigma: the final layer also outputs C variance channels (carried, not returned).
      num_classes: real classes; label num_classes is the null class.
      per_block_embedders: every block has its own timestep and class embedders (diffusers).
      timestep_logsnrs: an imported teacher's discrete lambda_k (k = 0..K-1); () for a DiT
        trained here on continuous time.
      use_guidance, guidance_fourier_dim: the student's w branch.
      parameterisation: how `denoiser` turns the prediction into x-hat ('both': x, then eps).
      attention_bias: the q, k, v projections have biases.
      norm_eps: epsilon of the LayerNorm before the MLP (diffusers' norm_eps).
      pos_interpolation_scale: positional embeddings at patch index / this.
      attention: the attention implementation (`distill_jax.attention`).
      remat: each block's rematerialisation policy (`models.remat`).
      mlp_ratio, dropout, dtype, logsnr_min, logsnr_max: as for the U-Net.
    """

    hidden: int
    depth: int
    num_heads: int
    patch_size: int
    out_channels: int
    num_classes: int
    learned_sigma: bool = False
    per_block_embedders: bool = False
    timestep_logsnrs: tuple[float, ...] = ()
    flow_timesteps: int = 0  # a flow-matching teacher's num_train_timesteps (its time input)
    use_guidance: bool = False
    guidance_fourier_dim: int = 32
    parameterisation: str = "eps"
    attention_bias: bool = True
    norm_eps: float = 1e-5
    pos_interpolation_scale: float = 1.0
    attention: str = "xla"
    remat: str = "none"
    mlp_ratio: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    logsnr_min: float = LOGSNR_MIN
    logsnr_max: float = LOGSNR_MAX
    both_shift: float = 0.0  # log-SNR where a 'both' head weighs x and eps equally

    def timestep(self, t: jax.Array) -> jax.Array:
        """The network's time input for t [B] in [0, 1] (see the module docstring)."""
        logsnr = logsnr_schedule_cosine(t, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)
        return network_timestep(
            logsnr, timestep_logsnrs=self.timestep_logsnrs, flow_timesteps=self.flow_timesteps
        )

    def _conditions(self, timestep, labels, w) -> list[jax.Array]:
        """One conditioning vector per block (all equal without per-block embedders)."""
        batch = jnp.shape(labels)[0]
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        copies = self.depth if self.per_block_embedders else 1
        conds = [
            TimestepLabelEmbedding(self.hidden, self.num_classes, self.dtype, name=f"embed_{i}")(
                timestep, labels
            )
            for i in range(copies)
        ]
        if self.use_guidance:
            guidance = GuidanceEmbedding(
                self.hidden, self.guidance_fourier_dim, dtype=self.dtype, name=GUIDANCE_BRANCH
            )(w, batch)
            conds = [c + guidance for c in conds]
        return conds * (self.depth // copies)

    def __call__(
        self,
        z: jax.Array,
        t: jax.Array,
        labels: jax.Array,
        w: jax.Array | None = None,
        train: bool = False,
        with_variance: bool = False,
    ) -> jax.Array:
        """The prediction [B, H, W, C] at times t [B] in [0, 1] (see `on_timesteps`)."""
        batch = jnp.shape(labels)[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        return self.on_timesteps(z, self.timestep(t), labels, w, train, with_variance)

    @nn.compact
    def on_timesteps(
        self,
        z: jax.Array,
        timestep: jax.Array,
        labels: jax.Array,
        w: jax.Array | None = None,
        train: bool = False,
        with_variance: bool = False,
    ) -> jax.Array:
        """The prediction [B, H, W, C] at the network's own time input `timestep` [B].

        That is diffusers' timestep for an imported DiT (what its forward takes). With
        `with_variance`, all output channels (2C with learned variance).
        """
        batch, height, width, _ = z.shape
        p = self.patch_size
        grid_h, grid_w = height // p, width // p
        x = nn.Conv(
            self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch"
        )(z.astype(self.dtype))
        x = x.reshape(batch, grid_h * grid_w, self.hidden)
        x = (
            x
            + jnp.asarray(
                positional_embedding(self.hidden, grid_h, grid_w, self.pos_interpolation_scale),
                x.dtype,
            )[None]
        )
        conds = self._conditions(timestep, labels, w)
        block = rematted(DiTBlock, self.remat, static_argnums=(3,))
        for i in range(self.depth):
            x = block(
                self.hidden,
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                self.attention_bias,
                self.norm_eps,
                self.dtype,
                self.attention,
                name=f"block_{i}",
            )(x, conds[i], train)
        shift, scale = jnp.split(
            nn.Dense(2 * self.hidden, kernel_init=_ZERO, dtype=self.dtype, name="final_ada")(
                nn.silu(conds[0])
            ),
            2,
            axis=-1,
        )
        x = _modulate(_layer_norm(1e-6, "norm_out")(x), shift, scale)
        predicted = output_channels(self.parameterisation, self.out_channels)
        channels = predicted + (self.out_channels if self.learned_sigma else 0)
        x = nn.Dense(p * p * channels, kernel_init=_ZERO, dtype=self.dtype, name="final_proj")(x)
        x = x.reshape(batch, grid_h, grid_w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        out = x.reshape(batch, height, width, channels).astype(jnp.float32)
        return out if with_variance else out[..., :predicted]


def check_patch_size(height: int, width: int, patch_size: int) -> None:
    """Refuse an image size the patch size does not divide."""
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"config.model.dit_patch_size={patch_size} must divide the image size {height}x{width}."
        )
