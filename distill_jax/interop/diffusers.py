"""Read a teacher trained elsewhere from a diffusers folder: DiT weights and its discrete schedule.

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
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from distill_jax import config as config_lib
from distill_jax import trees
from distill_jax.diffusion import discrete
from distill_jax.models import denoiser
from distill_jax.safetensors_file import read_safetensors_file
from distill_jax.safetensors_file import read_safetensors_shapes as read_safetensors_shapes_file
from distill_jax.tensor_map import match_named_tensors

PyTree = Any
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
# Discrete DDPM-family schedulers: they share the training schedule's keys (betas, steps,
# prediction_type), whatever sampler they implement.
SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)


class FolderError(ValueError):
    """A diffusers folder that cannot be imported; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class ImportedTeacher:
    """What a diffusers folder gives: the model's config keys, its weights and its record.

    Attributes:
      model: config.model keys that build the same network here (kind 'dit').
      logsnr_range: (lambda_{K-1}, lambda_0) of its discrete schedule, the trained range.
      data_shape: one example (H, W, C) the network takes.
      num_classes: its real classes (the null class is label num_classes).
      params: the weights as this library's DiT params (numpy float32); None when read with
        weights=False.
      record: source folder, checksum, schedule and conventions, for FINISHED.json.
    """

    model: dict
    logsnr_range: tuple[float, float]
    data_shape: tuple[int, int, int]
    num_classes: int
    params: PyTree
    record: dict


def read_json(path: str, what: str) -> dict:
    """The JSON object in `path`; FolderError naming `what` when it is missing or malformed."""
    if not os.path.isfile(path):
        raise FolderError(f"{what}: {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise FolderError(f"{what}: {path} is not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise FolderError(f"{what}: {path} holds no JSON object")
    return value


def _require(cfg: dict, key: str, accepted: tuple, where: str) -> None:
    if cfg.get(key) not in accepted:
        raise FolderError(
            f"{where} has {key}={cfg.get(key)!r}: accepted {', '.join(map(repr, accepted))}"
        )


def dit_model_config(cfg: dict, where: str = "transformer/config.json") -> dict:
    """config.model keys of a diffusers DiT config (either layout).

    Raises:
      FolderError: a class, norm or activation this DiT does not implement.
    """
    _require(cfg, "_class_name", DIT_CLASSES, where)
    _require(cfg, "norm_type", ("ada_norm_zero",), where)
    _require(cfg, "activation_fn", ("gelu-approximate",), where)
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


def schedule_config(cfg: dict, where: str = "scheduler/scheduler_config.json") -> tuple[dict, str]:
    """(config.model.discrete_schedule keys, parameterisation) of a diffusers scheduler config.

    Raises:
      FolderError: a scheduler, beta schedule or prediction type that is not supported.
    """
    _require(cfg, "_class_name", SCHEDULERS, where)
    if cfg.get("trained_betas") is not None:
        raise FolderError(f"{where} has trained_betas: accepted null (a named beta_schedule)")
    if cfg.get("rescale_betas_zero_snr"):
        raise FolderError(
            f"{where} has rescale_betas_zero_snr=true: accepted false (a zero terminal SNR has "
            "no finite log-SNR)"
        )
    _require(cfg, "beta_schedule", discrete.BETA_SCHEDULES, where)
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in discrete.PREDICTION_TYPES:
        raise FolderError(
            f"{where} has prediction_type={prediction!r}: accepted "
            f"{', '.join(map(repr, discrete.PREDICTION_TYPES))}"
        )
    schedule = dict(
        beta_schedule=cfg["beta_schedule"],
        beta_start=float(cfg.get("beta_start", 0.0001)),
        beta_end=float(cfg.get("beta_end", 0.02)),
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
    )
    return schedule, discrete.parameterisation_of(prediction)


def read_schedule(folder: str) -> tuple[dict, dict]:
    """(config.model keys, record entries) of a pipeline folder's scheduler/.

    The keys are the discrete schedule and the parameterisation; the record holds the
    scheduler's class, the schedule with the sampling settings diffusers' DDIM reads
    (prediction type, timestep spacing, steps offset, set_alpha_to_one, clip_sample) and the
    trained log-SNR range [lambda_{K-1}, lambda_0].

    Raises:
      FolderError: a missing or unsupported scheduler config.
    """
    scheduler = read_json(
        os.path.join(folder, "scheduler", "scheduler_config.json"), "the scheduler config"
    )
    schedule, parameterisation = schedule_config(scheduler)
    table = discrete.logsnr_table(
        schedule["beta_schedule"],
        num_timesteps=schedule["num_train_timesteps"],
        beta_start=schedule["beta_start"],
        beta_end=schedule["beta_end"],
    )
    record = dict(
        scheduler_class=scheduler["_class_name"],
        schedule=dict(
            schedule,
            prediction_type=scheduler.get("prediction_type", "epsilon"),
            timestep_spacing=scheduler.get("timestep_spacing", "leading"),
            steps_offset=int(scheduler.get("steps_offset", 0)),
            set_alpha_to_one=bool(scheduler.get("set_alpha_to_one", True)),
            clip_sample=bool(scheduler.get("clip_sample", False)),
        ),
        logsnr_range=list(discrete.trained_logsnr_range(table)),
    )
    return dict(discrete_schedule=schedule, parameterisation=parameterisation), record


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        shards = sorted(set(read_json(index, "the weights index").get("weight_map", {}).values()))
        return [os.path.join(folder, name) for name in shards]
    single = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(single):
        raise FolderError(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE})")
    return [single]


def _read_each_weight_file(folder: str, read_file) -> dict:
    """read_file(path) of every weight file of a model folder, merged; a refusal names it."""
    merged = {}
    for path in _weight_files(folder):
        try:
            merged.update(read_file(path))
        except (OSError, ValueError) as error:
            raise FolderError(f"{path}: {error}") from None
    return merged


def read_safetensors_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor of a model folder, from the files' headers alone."""
    return _read_each_weight_file(folder, read_safetensors_shapes_file)


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


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a diffusers model folder, as float32 numpy arrays (no PyTorch)."""
    return _read_each_weight_file(folder, read_safetensors_file)


def weights_checksum(folder: str) -> str:
    """sha256 over the model folder's weight files, in name order."""
    digest = hashlib.sha256()
    for path in _weight_files(folder):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


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


def to_flax_layout(tensor: np.ndarray, flax_name: str, shape: tuple = ()) -> np.ndarray:
    """A PyTorch tensor in our layout: Linear [out, in] -> [in, out], Conv2d OIHW -> HWIO."""
    del shape  # the DiT's kernels are all 2-D or 4-D
    if flax_name.endswith("/kernel"):
        return tensor.T if tensor.ndim == 2 else tensor.transpose(2, 3, 1, 0)
    return tensor


def match_params(
    shapes: dict[str, Sequence[int]],
    abstract: PyTree,
    where: str,
    *,
    name_of=diffusers_name,
    layout=to_flax_layout,
    what: str = "a DiT",
    hint: str | None = None,
) -> dict[str, str]:
    """{diffusers name: our parameter name} of tensors' {name: PyTorch shape}, all of them used.

    `name_of(our name)` is the diffusers name of a parameter, `layout(tensor, our name, shape)`
    puts a tensor in our layout (checked here on a stand-in of no memory). `hint` is added when
    names are missing or left over.

    Raises:
      FolderError: tensors missing, left over, or of another shape, naming them.
    """
    named = trees.named_leaves(abstract)
    wanted = {name_of(name): name for name in named}

    def our_shape(torch_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        name = wanted[torch_name]
        stand_in = np.broadcast_to(np.zeros((), np.float32), shape)
        return layout(stand_in, name, tuple(named[name].shape)).shape

    match_named_tensors(
        shapes,
        {torch_name: tuple(named[name].shape) for torch_name, name in wanted.items()},
        where,
        what=what,
        our_shape=our_shape,
        hint=hint,
        error=FolderError,
    )
    return wanted


def convert_params(
    tensors: dict[str, np.ndarray],
    abstract: PyTree,
    where: str,
    *,
    layout=to_flax_layout,
    **mapping,
) -> PyTree:
    """Our params (the structure of `abstract`) from diffusers tensors, all of them used.

    `layout` and `mapping` (name_of, what, hint) as `match_params` takes them.

    Raises:
      FolderError: tensors missing, left over, or of another shape (`match_params`).
    """
    shapes = {name: tensor.shape for name, tensor in tensors.items()}
    wanted = match_params(shapes, abstract, where, layout=layout, **mapping)
    named = trees.named_leaves(abstract)
    leaves = {
        name: np.asarray(layout(tensors[torch_name], name, tuple(named[name].shape)), np.float32)
        for torch_name, name in wanted.items()
    }
    with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return jax.tree_util.tree_unflatten(
        treedef, [leaves[trees.leaf_name(path)] for path, _ in with_path]
    )


def model_config(model_keys: dict) -> ml_collections.ConfigDict:
    """The schema's config.model with an import's keys applied."""
    model = config_lib.base_config().model
    for key, value in model_keys.items():
        if isinstance(value, dict):
            model[key].update(value)
        else:
            model[key] = value
    return model


def abstract_dit_params(model_keys: dict, data_shape: tuple, num_classes: int) -> PyTree:
    """Shapes of our DiT's parameters for the imported keys (jax.eval_shape, no weights)."""
    model = denoiser.build_model(
        model_config(model_keys), data_shape=data_shape, num_classes=num_classes, use_guidance=False
    )
    return jax.eval_shape(
        lambda: denoiser.init_params(model, jax.random.PRNGKey(0), data_shape=data_shape)
    )


def read_dit_weights(imported: ImportedTeacher) -> PyTree:
    """The imported folder's transformer weights as our DiT's params (numpy float32).

    Raises:
      FolderError: tensors missing, left over or misshapen (`convert_params`).
    """
    transformer = os.path.join(imported.record["source"], "transformer")
    abstract = abstract_dit_params(imported.model, imported.data_shape, imported.num_classes)
    return convert_params(read_safetensors(transformer), abstract, transformer)


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
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FolderError(f"{folder} is not a directory")
    transformer = os.path.join(folder, "transformer")
    if not os.path.isdir(transformer):
        raise FolderError(
            f"{folder} is not a diffusers DiT pipeline folder: it has no transformer/ "
            "(accepted: a folder with transformer/ and scheduler/, as DiTPipeline.save_pretrained "
            "writes)"
        )
    cfg = read_json(os.path.join(transformer, "config.json"), "the transformer config")
    model = dit_model_config(cfg)
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
