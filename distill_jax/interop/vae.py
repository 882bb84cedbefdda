"""Read a diffusers AutoencoderKL (a pipeline's vae/ folder) into `models.kl_vae`, no PyTorch.

A vae/ folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or shards listed
by its `.index.json`), as `AutoencoderKL.save_pretrained` writes them (Stable Diffusion 1.x
and 2.x ship one). Only the layout Stable Diffusion uses is accepted: DownEncoderBlock2D and
UpDecoderBlock2D levels, SiLU, no per-channel latents_mean/latents_std.

Every tensor is mapped by name and shape and nothing may be left over on either side: Conv2d
OIHW -> HWIO, Linear [out, in] -> [in, out]. Older checkpoints name the mid-block attention's
projections query/key/value/proj_attn (diffusers renames them to to_q/to_k/to_v/to_out.0 on
load, and so does this reader), and some store them 1x1-conv shaped [C, C, 1, 1]: both read.

The latents a diffusion model of such a pipeline learnt on are
(mean(q(z | x)) - shift_factor) * scaling_factor (shift 0 when null); `read_vae_folder`'s
record carries both, and `autoencoder.make_codec` applies them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from distill_jax.interop.core import (
    FolderError,
    check_layer_count,
    convert_params,
    count_layers,
    existing_folder,
    integer,
    match_params,
    number,
    read_json,
    read_safetensors,
    read_safetensors_shapes,
    weights_checksum,
)
from distill_jax.models import kl_vae

PyTree = Any
VAE_CLASS = "AutoencoderKL"
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers' AutoencoderKL defaults for keys a config.json may omit.
DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=[64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
)
# The attention projections' names before diffusers 0.14 (AttentionBlock), and now.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_NAME = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_INDEXED = re.compile(r"^(.+)_(\d+)$")
_PARAMS = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _positive_int(cfg: dict, key: str, where: str) -> int:
    return integer(cfg, key, where, DEFAULTS[key])


def _flag(cfg: dict, key: str, where: str) -> bool:
    value = cfg.get(key, True)
    if not isinstance(value, bool):
        raise FolderError(f"{where} has {key}={value!r}: accepted true or false")
    return value


def _block_channels(cfg: dict, where: str) -> tuple[int, ...]:
    """block_out_channels, with the block types and group count checked against it."""
    channels = cfg.get("block_out_channels", DEFAULTS["block_out_channels"])
    if (
        not isinstance(channels, list | tuple)
        or not channels
        or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)
    ):
        raise FolderError(
            f"{where} has block_out_channels={channels!r}: accepted a list of positive integers"
        )
    for key, accepted in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        types = list(cfg.get(key, [accepted]))
        if any(kind != accepted for kind in types):
            raise FolderError(
                f"{where} has {key}={types!r}: accepted only {accepted!r} blocks (Stable "
                "Diffusion's AutoencoderKL layout)"
            )
        if len(types) != len(channels):
            raise FolderError(
                f"{where} has {len(types)} {key} for {len(channels)} block_out_channels: "
                "accepted one block per level"
            )
    groups = _positive_int(cfg, "norm_num_groups", where)
    if any(c % groups for c in channels):
        raise FolderError(
            f"{where} has norm_num_groups={groups}, which does not divide every one of "
            f"block_out_channels={list(channels)}"
        )
    return tuple(channels)


def _check_latent_convention(cfg: dict, where: str) -> None:
    """Refuse latent conventions `make_codec` does not apply."""
    number(cfg, "scaling_factor", where, DEFAULTS["scaling_factor"], positive=True)
    if cfg.get("shift_factor") is not None:
        number(cfg, "shift_factor", where)
    for key in ("latents_mean", "latents_std"):
        if cfg.get(key) is not None:
            raise FolderError(
                f"{where} has {key} set: accepted null (per-channel latent statistics are a "
                "pipeline convention this reader does not apply)"
            )


def vae_model(cfg: dict, where: str = "vae/config.json") -> kl_vae.AutoencoderKL:
    """The `kl_vae.AutoencoderKL` a diffusers vae/config.json describes (diffusers' defaults).

    Raises:
      FolderError: a class, activation, block type or latent convention not supported, or a
        malformed value, in one line naming what was found and what is accepted.
    """
    if cfg.get("_class_name") != VAE_CLASS:
        raise FolderError(
            f"{where} has _class_name={cfg.get('_class_name')!r}: accepted {VAE_CLASS!r}"
        )
    if cfg.get("act_fn", "silu") != "silu":
        raise FolderError(f"{where} has act_fn={cfg['act_fn']!r}: accepted 'silu'")
    channels = _block_channels(cfg, where)
    _check_latent_convention(cfg, where)
    return kl_vae.AutoencoderKL(
        in_channels=_positive_int(cfg, "in_channels", where),
        out_channels=_positive_int(cfg, "out_channels", where),
        block_out_channels=channels,
        layers_per_block=_positive_int(cfg, "layers_per_block", where),
        latent_channels=_positive_int(cfg, "latent_channels", where),
        norm_num_groups=_positive_int(cfg, "norm_num_groups", where),
        mid_block_add_attention=_flag(cfg, "mid_block_add_attention", where),
        use_quant_conv=_flag(cfg, "use_quant_conv", where),
        use_post_quant_conv=_flag(cfg, "use_post_quant_conv", where),
    )


def vae_record(cfg: dict, source: str, weights_sha256: str | None = None) -> dict:
    """What a run records of a diffusers VAE: where from, its weights and its latents."""
    shift = cfg.get("shift_factor")
    channels = cfg.get("block_out_channels", DEFAULTS["block_out_channels"])
    return dict(
        source=source,
        weights_sha256=weights_sha256,
        vae_class=VAE_CLASS,
        scaling_factor=float(cfg.get("scaling_factor", DEFAULTS["scaling_factor"])),
        shift_factor=None if shift is None else float(shift),
        in_channels=int(cfg.get("in_channels", DEFAULTS["in_channels"])),
        latent_channels=int(cfg.get("latent_channels", DEFAULTS["latent_channels"])),
        downsampling_factor=kl_vae.downsampling_factor(channels),
        block_out_channels=list(channels),
        sample_size=cfg.get("sample_size", DEFAULTS["sample_size"]),
    )


def vae_latent_shape(info: dict, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(H / f, W / f, latent_channels) of images (H, W[, C]), from a record or a config.json.

    Raises:
      ValueError: H or W not divisible by f, or C not the VAE's input channels.
    """
    if "downsampling_factor" in info:
        factor = int(info["downsampling_factor"])
    else:
        factor = kl_vae.downsampling_factor(
            info.get("block_out_channels", DEFAULTS["block_out_channels"])
        )
    height, width = int(image_shape[0]), int(image_shape[1])
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the VAE's downsampling factor "
            f"{factor}: use images whose sides are multiples of {factor}"
        )
    channels = int(info.get("in_channels", DEFAULTS["in_channels"]))
    if len(image_shape) > 2 and int(image_shape[2]) != channels:
        raise ValueError(f"images have {image_shape[2]} channels, the VAE takes {channels}")
    latent = int(info.get("latent_channels", DEFAULTS["latent_channels"]))
    return height // factor, width // factor, latent


def diffusers_name(flax_name: str) -> str:
    """The diffusers tensor name of one of `kl_vae.AutoencoderKL`'s parameters.

    'encoder/mid_block/attentions_0/to_out_0/kernel' ->
    'encoder.mid_block.attentions.0.to_out.0.weight'.
    """
    *modules, param = flax_name.split("/")
    return ".".join([_INDEXED.sub(r"\1.\2", m) for m in modules] + [_PARAMS[param]])


def current_names(tensors: dict[str, Any]) -> dict[str, Any]:
    """The tensors with pre-0.14 attention names (query, key, ...) renamed as diffusers does.

    A name whose current form is also present is kept as it is (and so reported left over).
    """
    renamed = {}
    for name, tensor in tensors.items():
        match = _OLD_NAME.match(name)
        new = f"{match[1]}.{_OLD_ATTENTION[match[2]]}.{match[3]}" if match else name
        renamed[name if new in tensors else new] = tensor
    return renamed


def to_vae_layout(tensor: np.ndarray, flax_name: str, shape: tuple) -> np.ndarray:
    """A PyTorch tensor in our layout: Conv2d OIHW -> HWIO, Linear [out, in] -> [in, out].

    A Linear stored 1x1-conv shaped [out, in, 1, 1] reads too; any other tensor is left as it is.
    """
    del flax_name
    if len(shape) == 4 and tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    if len(shape) == 2 and (tensor.ndim == 2 or tensor.shape[2:] == (1, 1)):
        return tensor.reshape(tensor.shape[:2]).T
    return tensor


def _ldm_hint(names) -> str | None:
    """A hint when the names are the original LDM checkpoint's, not diffusers'."""
    if any(name.startswith(("encoder.down.", "first_stage_model.")) for name in names):
        return (
            "the names are the original LDM checkpoint's: convert it to diffusers' format "
            "first (AutoencoderKL.from_single_file(...).save_pretrained(...))"
        )
    return None


def match_tensors(shapes: dict[str, Sequence[int]], abstract: PyTree, where: str) -> dict:
    """{diffusers name: our parameter name}, every tensor and every parameter used once.

    `shapes` maps (current) diffusers names to PyTorch shapes; `abstract` is our params or
    their shapes.

    Raises:
      FolderError: tensors missing, left over, or of another shape, naming them.
    """
    return match_params(shapes, abstract, where, **_vae_mapping(shapes))


def convert_vae_params(tensors: dict[str, np.ndarray], abstract: PyTree, where: str) -> PyTree:
    """Our params (the structure of `abstract`) from a VAE's tensors, float32 numpy.

    Raises:
      FolderError: tensors missing, left over or misshapen (`match_tensors`).
    """
    tensors = current_names(tensors)
    return convert_params(tensors, abstract, where, **_vae_mapping(tensors))


def _vae_mapping(found) -> dict:
    return dict(
        name_of=diffusers_name, layout=to_vae_layout, what="an AutoencoderKL", hint=_ldm_hint(found)
    )


def abstract_vae_params(model: kl_vae.AutoencoderKL) -> PyTree:
    """Shapes of the model's parameters (jax.eval_shape: no weights are made)."""
    return jax.eval_shape(lambda: kl_vae.init_params(model, jax.random.PRNGKey(0)))


def check_vae_sizes(model: kl_vae.AutoencoderKL, vae_dir: str) -> None:
    """The config's depth against the weights' headers, before a model is built.

    Weights in another naming (the original LDM checkpoint's) hold no encoder.down_blocks:
    their refusal, with its hint, comes from the tensor matching.
    """
    shapes = read_safetensors_shapes(vae_dir)
    if not count_layers(shapes, "encoder.down_blocks."):
        return
    where = os.path.join(vae_dir, "config.json")
    levels = len(model.block_out_channels)
    check_layer_count(shapes, "encoder.down_blocks.", levels, "block_out_channels (levels)", where)
    layers = model.layers_per_block
    check_layer_count(shapes, "encoder.down_blocks.0.resnets.", layers, "layers_per_block", where)


def load(abstract: PyTree, folder: str) -> PyTree:
    """An AutoencoderKL folder's weights as our KL VAE's params, shaped as `abstract`.

    numpy float32; `abstract` is `abstract_vae_params` of the model built for them.

    Raises:
      FolderError: tensors missing, left over or misshapen (`match_tensors`).
    """
    return convert_vae_params(read_safetensors(folder), abstract, folder)


def read_vae_folder(vae_dir: str) -> tuple[kl_vae.AutoencoderKL, PyTree, dict]:
    """(model, params, record) of a diffusers AutoencoderKL folder (a pipeline's vae/).

    params are numpy float32 in our layout; record holds source, weights_sha256,
    scaling_factor, shift_factor (None or a number), latent_channels, downsampling_factor,
    sample_size and the rest of `vae_record`.

    Raises:
      FolderError: the first thing that is missing or not supported, in one line.
    """
    folder = existing_folder(vae_dir)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path) and os.path.isdir(os.path.join(folder, "vae")):
        raise FolderError(
            f"{folder} has no config.json but a vae/: pass the pipeline's vae/ folder itself"
        )
    cfg = read_json(config_path, "the VAE config")
    model = vae_model(cfg, config_path)
    check_vae_sizes(model, folder)
    params = load(abstract_vae_params(model), folder)
    return model, params, vae_record(cfg, folder, weights_checksum(folder))


def read_vae_entry(
    folder: str, in_channels: int, network: str = "U-Net", configs_only: bool = False
) -> dict | None:
    """The record of a pipeline folder's vae/ (None without one); its latents must fit the net.

    `in_channels` is what the `network` (the U-Net, or a DiT's transformer) takes; configs_only
    leaves the weights' checksum out.

    Raises:
      FolderError: a VAE config that is missing, unsupported, or whose latent channels are
        not `in_channels`.
    """
    vae_dir = os.path.join(folder, "vae")
    if not os.path.isdir(vae_dir):
        return None
    cfg = read_json(os.path.join(vae_dir, "config.json"), "the VAE config")
    model = vae_model(cfg, os.path.join(vae_dir, "config.json"))
    if not configs_only:
        check_vae_sizes(model, vae_dir)
    checksum = None if configs_only else weights_checksum(vae_dir)
    record = vae_record(cfg, vae_dir, checksum)
    if record["latent_channels"] != int(in_channels):
        raise FolderError(
            f"{folder}: the VAE's latents have {record['latent_channels']} channels but the "
            f"{network} takes {in_channels}: the parts are not from one pipeline"
        )
    return record
