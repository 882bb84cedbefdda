"""A diffusers DiT folder (transformer/ and scheduler/) read into `models.dit.DiT`.

No PyTorch: `config.json` files and safetensors only. A pipeline folder (what
`DiTPipeline.save_pretrained` writes, e.g. facebook/DiT-XL-2-256) holds
- `transformer/`: `DiTTransformer2DModel`, or the older `Transformer2DModel` with
  norm_type 'ada_norm_zero' and a patch size (the layout DiT-XL-2-256 ships with). Both name
  their tensors alike; `config.json` plus `diffusion_pytorch_model.safetensors` (or shards
  listed by `diffusion_pytorch_model.safetensors.index.json`);
- `scheduler/scheduler_config.json`: a discrete DDPM-family scheduler (beta schedule,
  num_train_timesteps, prediction_type);
- optionally `vae/`: a latent model's AutoencoderKL, which this module does not read:
  `interop.pipeline.read_teacher_folder` records it and `interop.vae` reads it.
The schedule is `interop.scheduler`'s, the files and the tensor matching `interop.core`'s.

Every tensor is mapped by name and shape onto `models.dit.DiT` with per-block embedders (each
diffusers block has its own timestep and class embedders; the final layer uses block 0's), and
nothing may be left over on either side. The conventions found are recorded
(`ImportedTeacher.record`): diffusers' guidance_scale s is 1 + w here; the null class is label
num_classes (row num_embeds_ada_norm of every class table, DiTPipeline's 1000 on ImageNet);
DiTPipeline guides the noise prediction's data channels and passes the learned-variance
channels through unguided, which our samplers do not use.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from distill_jax.interop.core import (
    FolderError,
    ImportedTeacher,
    PyTree,
    convert_params,
    existing_folder,
    model_config,
    read_json,
    read_safetensors,
    read_safetensors_shapes,
    require,
    weights_checksum,
)
from distill_jax.interop.scheduler import read_schedule
from distill_jax.interop.sd3 import CLASS_NAME as SD3_CLASS
from distill_jax.models import denoiser

DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def dit_model_config(cfg: dict, where: str = "transformer/config.json") -> dict:
    """config.model keys of a diffusers DiT config (either layout).

    Raises:
      FolderError: a class, norm or activation this DiT does not implement.
    """
    if cfg.get("_class_name") not in DIT_CLASSES:
        raise FolderError(
            f"{where} has _class_name={cfg.get('_class_name')!r}: accepted "
            f"{', '.join(map(repr, DIT_CLASSES))} (a DiT pipeline) or {SD3_CLASS!r} (an SD3 / "
            "SD3.5 pipeline)"
        )
    require(cfg, "norm_type", ("ada_norm_zero",), where)
    require(cfg, "activation_fn", ("gelu-approximate",), where)
    if cfg.get("norm_elementwise_affine", False):
        raise FolderError(f"{where} has norm_elementwise_affine=true: accepted false")
    for key in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):
        if cfg.get(key) is not None:
            raise FolderError(f"{where} has {key}={cfg[key]!r}: a DiT has none (accepted null)")
    for key in ("patch_size", "num_embeds_ada_norm", "sample_size", "in_channels"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise FolderError(f"{where} has {key}={cfg.get(key)!r}: accepted a positive integer")
    for key in ("num_layers", "num_attention_heads", "attention_head_dim"):  # defaults if absent
        value = cfg.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FolderError(f"{where} has {key}={value!r}: accepted a positive integer")
    in_channels = cfg["in_channels"]
    out_channels = cfg.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise FolderError(
            f"{where} has out_channels={out_channels} for in_channels={in_channels}: accepted "
            f"{in_channels} (no learned variance) or {2 * in_channels} (learned variance)"
        )
    heads, head_dim = (
        int(cfg.get("num_attention_heads", 16)),
        int(cfg.get("attention_head_dim", 72)),
    )
    return dict(
        kind="dit",
        dit_hidden=heads * head_dim,
        dit_depth=int(cfg.get("num_layers", 28)),
        num_heads=heads,
        dit_patch_size=int(cfg["patch_size"]),
        dit_mlp_ratio=4,
        dit_learned_sigma=out_channels == 2 * in_channels,
        dit_per_block_embedders=True,
        dit_attention_bias=bool(cfg.get("attention_bias", True)),
        dit_norm_eps=float(cfg.get("norm_eps", 1e-5)),
        # Transformer2DModel's default; DiTTransformer2DModel's PatchEmbed always uses 1.
        dit_pos_interpolation_scale=float(
            cfg.get("interpolation_scale") or max(int(cfg["sample_size"]) // 64, 1)
            if cfg["_class_name"] == "Transformer2DModel"
            else 1
        ),
        dropout=float(cfg.get("dropout", 0.0)),
        guidance_head="none",
        student_extra_blocks=0,
    )


_BLOCK_LAYERS = {
    "ada_linear": "norm1.linear",
    "to_q": "attn1.to_q",
    "to_k": "attn1.to_k",
    "to_v": "attn1.to_v",
    "to_out": "attn1.to_out.0",
    "ff_1": "ff.net.0.proj",
    "ff_2": "ff.net.2",
}
_EMBED_LAYERS = {
    "time_linear_1": "norm1.emb.timestep_embedder.linear_1",
    "time_linear_2": "norm1.emb.timestep_embedder.linear_2",
    "class_embed": "norm1.emb.class_embedder.embedding_table",
}
_TOP_LAYERS = {"patch": "pos_embed.proj", "final_ada": "proj_out_1", "final_proj": "proj_out_2"}
_PARAMS = {"kernel": "weight", "bias": "bias", "embedding": "weight"}


def diffusers_name(flax_name: str) -> str:
    """The diffusers tensor name of one of our DiT's parameters.

    'block_3/to_q/kernel' -> 'transformer_blocks.3.attn1.to_q.weight'.

    Raises:
      KeyError: a parameter diffusers' DiT has no counterpart for (a student's w branch).
    """
    *layers, param = flax_name.split("/")
    if len(layers) == 1 and layers[0] in _TOP_LAYERS:
        return f"{_TOP_LAYERS[layers[0]]}.{_PARAMS[param]}"
    if len(layers) == 2:
        owner, layer = layers
        kind, _, index = owner.rpartition("_")
        table = {"block": _BLOCK_LAYERS, "embed": _EMBED_LAYERS}.get(kind, {})
        if index.isdigit() and layer in table:
            return f"transformer_blocks.{index}.{table[layer]}.{_PARAMS[param]}"
    raise KeyError(f"{flax_name} has no diffusers counterpart")


def check_dit_sizes(model: dict, transformer: str) -> None:
    """The config's depth and width against the weights' headers, before a model is built.

    A config that claims a million layers is refused here, not built.
    """
    shapes = read_safetensors_shapes(transformer)
    blocks = {name.split(".")[1] for name in shapes if name.startswith("transformer_blocks.")}
    where = os.path.join(transformer, "config.json")
    if model["dit_depth"] != len(blocks):
        raise FolderError(
            f"{where} has num_layers={model['dit_depth']} but the weights hold {len(blocks)} "
            "transformer blocks: accepted the weights' count"
        )
    patch = shapes.get(f"pos_embed.proj.{_PARAMS['kernel']}")
    if patch is not None and patch[0] != model["dit_hidden"]:
        raise FolderError(
            f"{where} has num_attention_heads x attention_head_dim = {model['dit_hidden']} but "
            f"the weights' width is {patch[0]} (pos_embed.proj.weight): accepted the weights' width"
        )


def abstract_dit_params(model_keys: dict, data_shape: tuple, num_classes: int) -> PyTree:
    """Shapes of our DiT's parameters for the imported keys (jax.eval_shape, no weights)."""
    model = denoiser.build_model(
        model_config(model_keys), data_shape=data_shape, num_classes=num_classes, use_guidance=False
    )
    return jax.eval_shape(
        lambda: denoiser.init_params(model, jax.random.PRNGKey(0), data_shape=data_shape)
    )


def load(abstract: PyTree, folder: str) -> PyTree:
    """A DiTTransformer2DModel folder's weights as our DiT's params, shaped as `abstract`.

    numpy float32; `abstract` is `abstract_dit_params` of the DiT built for them.

    Raises:
      FolderError: tensors missing, left over or misshapen (`convert_params`).
    """
    return convert_params(
        read_safetensors(folder), abstract, folder, name_of=diffusers_name, what="a DiT"
    )


def read_dit_weights(imported: ImportedTeacher) -> PyTree:
    """The imported folder's transformer weights as our DiT's params (numpy float32)."""
    transformer = os.path.join(imported.record["source"], "transformer")
    return load(
        abstract_dit_params(imported.model, imported.data_shape, imported.num_classes),
        transformer,
    )


def read_dit_folder(
    folder: str, *, weights: bool = True, configs_only: bool = False
) -> ImportedTeacher:
    """Read a diffusers DiT pipeline folder (transformer/ and scheduler/) into our DiT.

    With weights=False the configs and the weights' checksum are read but not the tensors
    (params is None; `read_dit_weights` reads them later). configs_only (for a plan, before
    the weights are downloaded) reads the JSON files alone: no checksum (weights_sha256 None),
    and the sizes are not compared with the weights' headers.

    Raises:
      FolderError: the first thing that is missing or not supported, in one line.
    """
    folder = existing_folder(folder)
    transformer = os.path.join(folder, "transformer")
    if not os.path.isdir(transformer):
        raise FolderError(
            f"{folder} is not a diffusers DiT pipeline folder: it has no transformer/ "
            "(accepted: a folder with transformer/ and scheduler/, as DiTPipeline.save_pretrained "
            "writes)"
        )
    cfg = read_json(os.path.join(transformer, "config.json"), "the transformer config")
    model = dit_model_config(cfg, os.path.join(transformer, "config.json"))
    schedule_keys, schedule_record = read_schedule(folder)
    model.update(schedule_keys)
    size, channels = int(cfg["sample_size"]), int(cfg["in_channels"])
    num_classes = int(cfg["num_embeds_ada_norm"])
    if not configs_only:
        check_dit_sizes(model, transformer)
    record = dict(
        source=folder,
        weights_sha256=None if configs_only else weights_checksum(transformer),
        transformer_class=cfg["_class_name"],
        **schedule_record,
        conventions=dict(
            guidance="diffusers guidance_scale s = 1 + w",
            null_class=num_classes,
            guided_channels=f"the {channels} prediction channels",
            learned_variance=bool(model["dit_learned_sigma"]),
        ),
    )
    imported = ImportedTeacher(
        model=model,
        logsnr_range=tuple(schedule_record["logsnr_range"]),
        data_shape=(size, size, channels),
        num_classes=num_classes,
        params=None,
        record=record,
    )
    if not weights or configs_only:
        return imported
    return dataclasses.replace(imported, params=read_dit_weights(imported))
