"""Read diffusers' UNet2DConditionModel (a pipeline's `unet/`) into `models.sd_unet.SDUNet`.

No PyTorch: `unet/config.json` and safetensors only. The SD 1.x and 2.x layouts are read:
CrossAttnDownBlock2D / DownBlock2D levels, UNetMidBlock2DCrossAttn, UpBlock2D /
CrossAttnUpBlock2D levels, 1x1-conv or linear (`use_linear_projection`) transformer
projections, one head count or one per level (diffusers' `attention_head_dim` is the number of
heads, `num_attention_heads` where a config sets it), any `cross_attention_dim`. Everything a
config can switch on that SD 1.x / 2.x do not use (class embeddings, added embeddings, dual or
cross-only attention, other time embeddings or block types) is refused in one line naming the
key, so a U-Net that reads is one that computes what diffusers computes.

Every tensor is mapped by name and shape and nothing may be left over: our parameter
'down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel' is diffusers'
'down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight' (each '_N' of a module name
is '.N', except diffusers' own 'linear_1' and 'linear_2').
"""

from __future__ import annotations

import os

import numpy as np

from distill_jax.interop.core import (
    FolderError,
    PyTree,
    check_layer_count,
    convert_params,
    integer,
    integers,
    model_config,
    number,
    read_json,
    read_safetensors,
    read_safetensors_shapes,
)

UNET_CLASS = "UNet2DConditionModel"
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# Keys SD 1.x / 2.x leave at these values; anything else computes something SDUNet does not.
_FIXED = dict(
    act_fn="silu",
    center_input_sample=False,
    class_embed_type=None,
    addition_embed_type=None,
    num_class_embeds=None,
    dual_cross_attention=False,
    only_cross_attention=False,
    mid_block_type="UNetMidBlock2DCrossAttn",
    resnet_time_scale_shift="default",
    time_embedding_type="positional",
    time_cond_proj_dim=None,
    encoder_hid_dim=None,
    timestep_post_act=None,
    conv_in_kernel=3,
    conv_out_kernel=3,
    downsample_padding=1,
    mid_block_scale_factor=1,
    resnet_out_scale_factor=1.0,
    attention_type="default",
    reverse_transformer_layers_per_block=None,
    dropout=0.0,
)
_NATIVE = ("linear_1", "linear_2")  # diffusers names that end in _N themselves


def diffusers_unet_name(flax_name: str) -> str:
    """'down_blocks_0/resnets_1/conv1/kernel' -> 'down_blocks.0.resnets.1.conv1.weight'."""
    *modules, param = flax_name.split("/")
    parts = []
    for module in modules:
        stem, _, index = module.rpartition("_")
        parts.append(f"{stem}.{index}" if index.isdigit() and module not in _NATIVE else module)
    return ".".join(parts) + "." + ("bias" if param == "bias" else "weight")


def _per_level(cfg: dict, key: str, levels: int, where: str) -> tuple[int, ...]:
    """A positive integer per level (one integer stands for every level)."""
    value = cfg[key]
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
    ):
        raise FolderError(
            f"{where} has {key}={value!r}: accepted a positive integer or {levels} of them"
        )
    return values


def _check_fixed(cfg: dict, where: str) -> None:
    for key, value in _FIXED.items():
        if key in cfg and cfg[key] != value and not (value == 1 and cfg[key] == 1.0):
            raise FolderError(
                f"{where} has {key}={cfg[key]!r}, which SD 1.x / 2.x U-Nets do not use and "
                f"distill_jax does not implement: accepted {value!r}"
            )
    if cfg.get("_class_name") != UNET_CLASS:
        raise FolderError(
            f"{where} has _class_name={cfg.get('_class_name')!r}: accepted {UNET_CLASS!r}"
        )


def unet_model_config(cfg: dict, where: str = "unet/config.json") -> dict:
    """config.model keys (kind 'sd_unet' and model.sd_unet) of a diffusers U-Net config.

    Raises:
      FolderError: a block type or option this U-Net does not implement.
    """
    _check_fixed(cfg, where)
    channels = integers(cfg, "block_out_channels", where)
    levels = len(channels)
    down, up = cfg.get("down_block_types", ()), cfg.get("up_block_types", ())
    for types, accepted in ((down, DOWN_TYPES), (up, UP_TYPES)):
        if (
            not isinstance(types, list | tuple)
            or len(types) != levels
            or not all(t in accepted for t in types)
        ):
            raise FolderError(
                f"{where} has block types {types!r}: accepted {levels} of "
                f"{', '.join(accepted)} (one per block_out_channels entry)"
            )
    down, up = tuple(down), tuple(up)
    attention = tuple(DOWN_TYPES[t] for t in down)
    if tuple(UP_TYPES[t] for t in reversed(up)) != attention:
        raise FolderError(
            f"{where}: up_block_types {list(up)} do not mirror down_block_types {list(down)}"
        )
    heads_key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
    heads = _per_level(cfg, heads_key, levels, where)
    layers = (
        _per_level(cfg, "transformer_layers_per_block", levels, where)
        if ("transformer_layers_per_block" in cfg)
        else (1,) * levels
    )
    cross = integer(cfg, "cross_attention_dim", where, 1280)
    for c, h in zip(channels, heads, strict=True):
        if c % h:
            raise FolderError(f"{where}: {c} channels do not split into {h} attention heads")
    groups = integer(cfg, "norm_num_groups", where, 32)
    if any(c % groups for c in channels):
        raise FolderError(
            f"{where} has norm_num_groups={groups}, which does not divide every one of "
            f"block_out_channels={list(channels)}"
        )
    return dict(
        kind="sd_unet",
        sd_unet=dict(
            block_out_channels=channels,
            cross_attention=attention,
            heads=heads,
            transformer_layers=tuple(int(n) for n in layers),
            layers_per_block=integer(cfg, "layers_per_block", where, 2),
            norm_groups=groups,
            norm_eps=number(cfg, "norm_eps", where, 1e-5, positive=True),
            linear_projection=bool(cfg.get("use_linear_projection", False)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=number(cfg, "freq_shift", where, 0),
            cross_attention_dim=cross,
        ),
    )


def to_sd_layout(tensor: np.ndarray, flax_name: str, shape: tuple) -> np.ndarray:
    """A PyTorch tensor in our layout: Conv2d OIHW -> HWIO, Linear [out, in] -> [in, out].

    The attention's q, k and v kernels are reshaped to [in, heads, head].
    """
    if not flax_name.endswith("/kernel"):
        return tensor
    if tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    if tensor.ndim == 2 and len(shape) == 3 and tensor.T.shape == (shape[0], shape[1] * shape[2]):
        return tensor.T.reshape(shape)
    return tensor.T


def check_unet_sizes(model: dict, unet_dir: str) -> None:
    """The config's depth against the weights' headers, before a model is built."""
    where = os.path.join(unet_dir, "config.json")
    sd, shapes = model["sd_unet"], read_safetensors_shapes(unet_dir)
    levels = len(sd["block_out_channels"])
    check_layer_count(shapes, "down_blocks.", levels, "block_out_channels (levels)", where)
    layers = sd["layers_per_block"]
    check_layer_count(shapes, "down_blocks.0.resnets.", layers, "layers_per_block", where)


def load(abstract: PyTree, folder: str) -> PyTree:
    """A UNet2DConditionModel folder's weights as `SDUNet` params, shaped as `abstract`.

    numpy float32, every tensor used; `abstract` is the parameter shapes of the SDUNet built
    for them.

    Raises:
      FolderError: tensors missing, left over or misshapen.
    """
    return convert_params(
        read_safetensors(folder),
        abstract,
        folder,
        name_of=diffusers_unet_name,
        layout=to_sd_layout,
        what="a U-Net",
    )


def read_unet_config(unet_dir: str) -> tuple[dict, dict]:
    """(config.model keys, the raw config) of a pipeline's unet/ folder."""
    if not os.path.isdir(unet_dir):
        raise FolderError(f"{unet_dir} does not exist: a pipeline folder needs its unet/")
    cfg = read_json(os.path.join(unet_dir, "config.json"), "the U-Net config")
    return unet_model_config(cfg, os.path.join(unet_dir, "config.json")), cfg


__all__ = [
    "diffusers_unet_name",
    "model_config",
    "load",
    "read_unet_config",
    "to_sd_layout",
    "unet_model_config",
]
