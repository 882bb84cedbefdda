"""A diffusers SD3 / SD3.5 transformer folder (SD3Transformer2DModel) read into our MMDiT.

No PyTorch: `config.json` and safetensors only (`interop.core`). A transformer folder (what
`SD3Transformer2DModel.save_pretrained` writes, e.g. transformer/ of
stabilityai/stable-diffusion-3-medium-diffusers or stabilityai/stable-diffusion-3.5-medium)
holds `config.json` and `diffusion_pytorch_model.safetensors` (or shards listed by its
`.index.json`).

- `transformer_config` checks a config.json and gives MMDiT's field values; `mmdit_module`
  builds the module from them.
- `tensor_name` maps our parameter names onto diffusers' ('transformer_blocks_0/attn/to_q/
  kernel' -> 'transformer_blocks.0.attn.to_q.weight'): our modules carry diffusers' names, with
  '_' in place of '.' before a list index (transformer_blocks_N, to_out_0, net_0_proj, net_2).
- `match_transformer` maps a folder's {name: shape} onto the module by name and shape, every
  tensor used; `load(abstract, folder)` reads the weights through it.

The positional table `pos_embed.pos_embed` (a persistent buffer of diffusers' PatchEmbed when
pos_embed_max_size is set, [1, max^2, width]) is not a parameter here: MMDiT recomputes it.
Its shape is checked with the rest, and its values, when read, against the recomputation
(`check_positional_table`), within the rounding of a half-precision file.
Refused: anything this port does not implement (another class, qk_norm other than None or
'rms_norm', a caption width other than the token width, keys SD3Transformer2DModel does not
have); `skip_layers` is a sampling option of diffusers' forward, not a config key.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from distill_jax.interop.core import (
    FolderError,
    PyTree,
    check_layer_count,
    convert_params,
    integer,
    match_params,
    read_json,
    read_safetensors,
    read_safetensors_shapes,
    require,
)
from distill_jax.models.mmdit import MMDiT, init_params
from distill_jax.models.mmdit_blocks import position_table

CLASS_NAME = "SD3Transformer2DModel"
POS_EMBED = "pos_embed.pos_embed"
# diffusers' defaults (SD3Transformer2DModel.__init__) for keys a config.json leaves out.
_SIZES = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=18,
    attention_head_dim=64,
    num_attention_heads=18,
    joint_attention_dim=4096,
    caption_projection_dim=1152,
    pooled_projection_dim=2048,
    pos_embed_max_size=96,
)
_KEYS = {*_SIZES, "out_channels", "dual_attention_layers", "qk_norm"}
# Rounding of a table stored in bfloat16 (values in [-1, 1]: half an ulp is 2^-9); a table of
# another layout or base size differs by O(1).
POS_EMBED_TOLERANCE = 4e-3
_INDEXED = re.compile(r"^(transformer_blocks|to_out|net)_(\d+)(_proj)?$")
_PARAMS = {"kernel": "weight", "bias": "bias", "scale": "weight"}


def _layer_indices(cfg: dict, num_layers: int, where: str) -> tuple[int, ...]:
    value = cfg.get("dual_attention_layers", [])
    if (
        not isinstance(value, list | tuple)
        or any(isinstance(i, bool) or not isinstance(i, int) for i in value)
        or any(not 0 <= i < num_layers for i in value)
        or len(set(value)) != len(value)
    ):
        raise FolderError(
            f"{where} has dual_attention_layers={value!r}: accepted a list of distinct block "
            f"indices in 0..{num_layers - 1}"
        )
    return tuple(sorted(value))


def transformer_config(cfg: dict, where: str) -> dict:
    """MMDiT's field values (plain ints, a tuple, a str or None) of a transformer config.json.

    Raises:
      FolderError: a class, size or option this port does not implement, naming the key.
    """
    require(cfg, "_class_name", (CLASS_NAME,), where)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _KEYS)
    if unknown:
        raise FolderError(
            f"{where} has {unknown[0]}={cfg[unknown[0]]!r}: accepted the keys of {CLASS_NAME} "
            f"({', '.join(sorted(_KEYS))})"
        )
    fields = {key: integer(cfg, key, where, default) for key, default in _SIZES.items()}
    fields["out_channels"] = (
        fields["in_channels"]
        if cfg.get("out_channels") is None
        else integer(cfg, "out_channels", where)
    )
    require(cfg, "qk_norm", (None, "rms_norm"), where)
    fields["qk_norm"] = cfg.get("qk_norm")
    fields["dual_attention_layers"] = _layer_indices(cfg, fields["num_layers"], where)
    width = fields["num_attention_heads"] * fields["attention_head_dim"]
    if fields["caption_projection_dim"] != width:
        raise FolderError(
            f"{where} has caption_projection_dim={fields['caption_projection_dim']}: accepted "
            f"num_attention_heads x attention_head_dim = {width} (the text stream's width)"
        )
    if width % 4:
        raise FolderError(
            f"{where} has num_attention_heads x attention_head_dim = {width}: accepted a multiple "
            "of 4 (2-D sine-cosine positions)"
        )
    grid = fields["sample_size"] // fields["patch_size"]
    if not 1 <= grid <= fields["pos_embed_max_size"]:
        raise FolderError(
            f"{where} has sample_size={fields['sample_size']}, patch_size="
            f"{fields['patch_size']}, pos_embed_max_size={fields['pos_embed_max_size']}: accepted "
            "1 <= sample_size // patch_size <= pos_embed_max_size"
        )
    return fields


def mmdit_module(fields: dict, **extra) -> MMDiT:
    """The MMDiT of `transformer_config`'s fields; `extra` sets the others (use_guidance, ...)."""
    return MMDiT(**fields, **extra)


def tensor_name(our_name: str) -> str:
    """The diffusers tensor name of one of our MMDiT's parameters.

    'transformer_blocks_0/attn/to_q/kernel' -> 'transformer_blocks.0.attn.to_q.weight',
    'transformer_blocks_3/ff/net_0_proj/bias' -> 'transformer_blocks.3.ff.net.0.proj.bias'.

    Raises:
      KeyError: a parameter diffusers' transformer has no counterpart for (a student's w branch).
    """
    *layers, param = our_name.split("/")
    if not layers or param not in _PARAMS or layers[0].startswith("guidance"):
        raise KeyError(f"{our_name} has no diffusers counterpart")
    parts = []
    for layer in layers:
        match = _INDEXED.match(layer)
        parts.append(".".join(g.lstrip("_") for g in match.groups() if g) if match else layer)
    return ".".join(parts + [_PARAMS[param]])


def teacher_params_shape(module: MMDiT) -> PyTree:
    """Shapes of the teacher's parameters (no guidance branch), by jax.eval_shape: no weights."""
    teacher = module.clone(use_guidance=False)
    return jax.eval_shape(lambda: init_params(teacher, jax.random.PRNGKey(0)))


def match_transformer(
    shapes: dict, module: MMDiT, where: str, abstract: PyTree | None = None
) -> dict[str, str]:
    """{diffusers name: our name} of a folder's {name: PyTorch shape}, every tensor used.

    The positional table, when held, must be [1, pos_embed_max_size^2, width]; it maps to
    nothing (MMDiT recomputes it).

    Raises:
      FolderError: tensors missing, left over or misshapen, naming them.
    """
    shapes = dict(shapes)
    table = shapes.pop(POS_EMBED, None)
    want = (1, module.pos_embed_max_size**2, module.hidden)
    if table is not None and tuple(table) != want:
        raise FolderError(
            f"{where}: tensor {POS_EMBED} has shape {tuple(table)}, which does not fit its "
            f"config.json (expected {want})"
        )
    abstract = teacher_params_shape(module) if abstract is None else abstract
    return match_params(shapes, abstract, where, name_of=tensor_name, what="an SD3 transformer")


def check_positional_table(table: np.ndarray, module: MMDiT, where: str) -> None:
    """Refuse a stored pos_embed.pos_embed that is not the table MMDiT recomputes.

    Checked row by row of the grid (entry (r, c) is [t[c], t[r]]): no copy of the whole table.
    """
    size, half = module.pos_embed_max_size, module.hidden // 2
    expected = position_table(module.hidden, size, module.sample_size // module.patch_size)
    grid = np.asarray(table).reshape(size, size, module.hidden)
    worst = 0.0
    for r in range(size):
        worst = max(
            worst,
            float(np.max(np.abs(grid[r, :, :half] - expected))),
            float(np.max(np.abs(grid[r, :, half:] - expected[r]))),
        )
    if not worst <= POS_EMBED_TOLERANCE:
        raise FolderError(
            f"{where}: tensor {POS_EMBED} differs from the 2-D sine-cosine table of its "
            f"config.json by {worst:.3g} (accepted up to {POS_EMBED_TOLERANCE}: diffusers' "
            "get_2d_sincos_pos_embed at base size sample_size // patch_size)"
        )


def _config_module(folder: str) -> MMDiT:
    """The MMDiT a transformer folder's config.json describes."""
    where = os.path.join(folder, "config.json")
    return mmdit_module(transformer_config(read_json(where, "the transformer config"), where))


def _check_depth(module: MMDiT, folder: str) -> dict:
    """The weights' {name: shape} (headers alone), refused unless they hold num_layers blocks."""
    shapes = read_safetensors_shapes(folder)
    where = os.path.join(folder, "config.json")
    check_layer_count(shapes, "transformer_blocks.", module.num_layers, "num_layers", where)
    return shapes


def load(abstract: PyTree, folder: str) -> PyTree:
    """A transformer folder's weights as MMDiT teacher params, shaped as `abstract`.

    numpy float32, no guidance branch; `abstract` is `teacher_params_shape` of the MMDiT built
    for them.

    The layer count of its config.json, then every name and shape, are checked against the
    files' headers before any tensor is read.

    Raises:
      FolderError: the first thing that does not fit, naming the file and the key or tensor.
    """
    folder = os.fspath(folder)
    module = _config_module(folder)
    shapes = _check_depth(module, folder)
    match_transformer(shapes, module, folder, abstract)
    tensors = read_safetensors(folder)
    table = tensors.pop(POS_EMBED, None)
    if table is not None:
        check_positional_table(table, module, folder)
    return convert_params(tensors, abstract, folder, name_of=tensor_name, what="an SD3 transformer")


def read_transformer_folder(folder: str, **extra) -> tuple[MMDiT, PyTree]:
    """(MMDiT, teacher params) of a transformer folder; `extra` as `mmdit_module` takes it."""
    folder = os.fspath(folder)
    module = _config_module(folder).clone(**extra)
    _check_depth(module, folder)  # before the module's shapes are traced
    return module, load(teacher_params_shape(module), folder)
