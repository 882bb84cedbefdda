"""The registry of network kinds (config.model.kind): each kind's builder and what it takes.

`denoiser.build_model` checks what every kind shares (dtype, parameterisation, guidance head),
then the kind's `ModelKind`: the data it takes (images [H, W, C], which an autoencoder's
latents also are, or vectors [D]), its conditioning (class labels, text token states), the
last layer a student head converts (`student_head`), whether it grows the students'
extra blocks, and its builder. `config_checks` validates configs against the same entries. A
new network kind is its module in models/ and one entry in `MODEL_KINDS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import ml_collections

from distill_jax.diffusion import discrete
from distill_jax.models.dit import DiT, check_patch_size
from distill_jax.models.mlp import MLPDenoiser
from distill_jax.models.mmdit import OUTPUT_LAYER as MMDIT_OUTPUT_LAYER
from distill_jax.models.mmdit import MMDiT, condition_width
from distill_jax.models.sd_unet import SDUNet
from distill_jax.models.sd_unet import check_image_size as check_sd_image_size
from distill_jax.models.unet import UNet, check_image_size

# model.mmdit's integer sizes, passed to MMDiT as they are.
MMDIT_SIZES = (
    "sample_size",
    "patch_size",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
)
# (config.model, one example's shape, the text states' width or 0, the shared module keys)
Builder = Callable[[ml_collections.ConfigDict, tuple[int, ...], int, dict], nn.Module]


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One network kind.

    Attributes:
      build: the module from (config.model, data shape, text width, shared keys); it refuses
        sizes that do not fit (ValueError naming the key).
      images: takes images [H, W, C] (and so latents); else vectors [D].
      labels: can condition on class labels (a null class for guidance's unconditional half).
      text: can condition on text token states [L, D].
      output_layer: its last layer's name; the layer's last axis is (positions x) channels.
      extra_blocks: grows model.student_extra_blocks in the students.
      text_width: the width of the text conditions it takes, from config.model (an imported
        network's text side); None: the bundled MiniLM's.
      patch_size: the side of the patches it makes tokens of (1 for a network on pixels or
        latents directly): a dynamically shifted flow schedule counts them.
    """

    build: Builder
    images: bool
    labels: bool
    text: bool
    output_layer: str
    extra_blocks: bool = False
    text_width: Callable[[ml_collections.ConfigDict], int] | None = None
    patch_size: Callable[[ml_collections.ConfigDict], int] = lambda m: 1


def discrete_logsnrs(model_config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """lambda_k of `model.discrete_schedule` (() for a network on continuous time)."""
    schedule = model_config.discrete_schedule
    if not schedule.beta_schedule:
        return ()
    table = discrete.logsnr_table(
        schedule.beta_schedule,
        num_timesteps=int(schedule.num_train_timesteps),
        beta_start=float(schedule.beta_start),
        beta_end=float(schedule.beta_end),
    )
    return tuple(float(v) for v in table)


def _build_mlp(m: ml_collections.ConfigDict, data_shape, text_dim: int, common: dict):
    del data_shape, text_dim  # vectors, class labels: checked by build_model
    return MLPDenoiser(hidden=int(m.mlp_hidden), depth=int(m.mlp_depth), **common)


def _build_unet(m: ml_collections.ConfigDict, data_shape, text_dim: int, common: dict) -> UNet:
    # Tuples, not lists: the module is hashed when it rides as static data under jit.
    channel_mult = tuple(int(c) for c in m.channel_mult)
    check_image_size(data_shape[0], data_shape[1], channel_mult)
    return UNet(
        channels=int(m.channels),
        channel_mult=channel_mult,
        num_res_blocks=int(m.num_res_blocks),
        attn_resolutions=tuple(int(r) for r in m.attn_resolutions),
        num_heads=int(m.num_heads),
        student_extra_blocks=int(m.student_extra_blocks),
        text_dim=int(text_dim),
        attention=str(m.attention),
        remat=str(m.remat),
        **common,
    )


def _build_dit(
    m: ml_collections.ConfigDict, data_shape: tuple[int, ...], text_dim: int, common: dict
) -> DiT:
    del text_dim  # class labels: checked by build_model
    if m.guidance_head != "none":
        raise ValueError(
            f"config.model.guidance_head={m.guidance_head!r} is not available for "
            "model.kind='dit': accepted 'none'."
        )
    if int(m.dit_hidden) % int(m.num_heads):
        raise ValueError(
            f"config.model.dit_hidden={m.dit_hidden} must be a multiple of "
            f"config.model.num_heads={m.num_heads}."
        )
    check_patch_size(data_shape[0], data_shape[1], int(m.dit_patch_size))
    common = {k: v for k, v in common.items() if k not in ("emb_dim", "guidance_head")}
    return DiT(
        hidden=int(m.dit_hidden),
        depth=int(m.dit_depth),
        num_heads=int(m.num_heads),
        patch_size=int(m.dit_patch_size),
        out_channels=data_shape[2],
        # A 'both' student reuses the learned-variance channels as its x head.
        learned_sigma=bool(m.dit_learned_sigma) and m.parameterisation != "both",
        per_block_embedders=bool(m.dit_per_block_embedders),
        timestep_logsnrs=discrete_logsnrs(m),
        flow_timesteps=int(m.flow_schedule.num_train_timesteps),
        mlp_ratio=int(m.dit_mlp_ratio),
        attention_bias=bool(m.dit_attention_bias),
        norm_eps=float(m.dit_norm_eps),
        pos_interpolation_scale=float(m.dit_pos_interpolation_scale),
        attention=str(m.attention),
        remat=str(m.remat),
        **common,
    )


def _build_sd_unet(
    m: ml_collections.ConfigDict, data_shape: tuple[int, ...], text_dim: int, common: dict
) -> SDUNet:
    sd = m.sd_unet
    if text_dim != int(sd.cross_attention_dim):
        raise ValueError(
            f"config.model.kind='sd_unet' cross-attends to text states of width "
            f"{sd.cross_attention_dim} (model.sd_unet.cross_attention_dim), but the run's text "
            f"condition is {text_dim} wide" + ("" if text_dim else " (a class-label run)") + "."
        )
    if m.guidance_head != "none":
        raise ValueError(
            f"config.model.guidance_head={m.guidance_head!r} is not available for "
            "model.kind='sd_unet': accepted 'none'."
        )
    levels = len(sd.block_out_channels)
    per_level = ("cross_attention", "heads", "transformer_layers")
    if any(len(sd[key]) != levels for key in per_level):
        raise ValueError(
            f"config.model.sd_unet's {', '.join(per_level)} must have one entry per level "
            f"({levels}, as block_out_channels)."
        )
    check_sd_image_size(data_shape[0], data_shape[1], levels)
    common = {
        k: v
        for k, v in common.items()
        if k not in ("emb_dim", "guidance_head", "dropout", "num_classes")
    }
    return SDUNet(
        block_out_channels=tuple(int(c) for c in sd.block_out_channels),
        cross_attention=tuple(bool(a) for a in sd.cross_attention),
        heads=tuple(int(h) for h in sd.heads),
        transformer_layers=tuple(int(n) for n in sd.transformer_layers),
        layers_per_block=int(sd.layers_per_block),
        out_channels=data_shape[2],
        norm_groups=int(sd.norm_groups),
        norm_eps=float(sd.norm_eps),
        linear_projection=bool(sd.linear_projection),
        flip_sin_to_cos=bool(sd.flip_sin_to_cos),
        freq_shift=float(sd.freq_shift),
        text_dim=int(text_dim),
        timestep_logsnrs=discrete_logsnrs(m),
        flow_timesteps=int(m.flow_schedule.num_train_timesteps),
        attention=str(m.attention),
        remat=str(m.remat),
        **common,
    )


def _build_mmdit(
    m: ml_collections.ConfigDict, data_shape: tuple[int, ...], text_dim: int, common: dict
) -> MMDiT:
    mm = m.mmdit
    width = condition_width(mm.joint_attention_dim, mm.pooled_projection_dim)
    if text_dim != width:
        raise ValueError(
            f"config.model.kind='mmdit' takes packed text conditions {width} wide "
            f"(model.mmdit's joint_attention_dim and pooled_projection_dim), but the run's text "
            f"condition is {text_dim} wide" + ("" if text_dim else " (a class-label run)") + "."
        )
    for key, accepted in (("parameterisation", "both"), ("guidance_head", "affine")):
        if m[key] == accepted:
            raise ValueError(
                f"config.model.{key}={accepted!r} is not available for model.kind='mmdit': "
                "its output layer has the data's channels only."
            )
    if data_shape[0] % int(mm.patch_size) or data_shape[1] % int(mm.patch_size):
        raise ValueError(
            f"config.model.mmdit.patch_size={mm.patch_size} does not divide the data's "
            f"{data_shape[0]}x{data_shape[1]}."
        )
    keep = ("use_guidance", "guidance_fourier_dim", "parameterisation", "dtype")
    keep += ("logsnr_min", "logsnr_max", "both_shift")
    return MMDiT(
        **{key: int(mm[key]) for key in MMDIT_SIZES},
        in_channels=data_shape[2],
        out_channels=data_shape[2],
        dual_attention_layers=tuple(int(i) for i in mm.dual_attention_layers),
        qk_norm=str(mm.qk_norm) or None,
        timestep_logsnrs=discrete_logsnrs(m),
        flow_timesteps=int(m.flow_schedule.num_train_timesteps),
        attention=str(m.attention),
        remat=str(m.remat),
        **{key: common[key] for key in keep},
    )


MODEL_KINDS = {
    "unet": ModelKind(
        _build_unet, images=True, labels=True, text=True, output_layer="out_conv", extra_blocks=True
    ),
    "mlp": ModelKind(
        _build_mlp, images=False, labels=True, text=False, output_layer="output_dense"
    ),
    "dit": ModelKind(
        _build_dit,
        images=True,
        labels=True,
        text=False,
        output_layer="final_proj",
        patch_size=lambda m: int(m.dit_patch_size),
    ),
    "sd_unet": ModelKind(
        _build_sd_unet,
        images=True,
        labels=False,
        text=True,
        output_layer="conv_out",
        text_width=lambda m: int(m.sd_unet.cross_attention_dim),
    ),
    "mmdit": ModelKind(
        _build_mmdit,
        images=True,
        labels=False,
        text=True,
        output_layer=MMDIT_OUTPUT_LAYER,
        text_width=lambda m: condition_width(
            m.mmdit.joint_attention_dim, m.mmdit.pooled_projection_dim
        ),
        patch_size=lambda m: int(m.mmdit.patch_size),
    ),
}
