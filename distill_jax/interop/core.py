"""The shared core of every reader of models trained elsewhere: files, tensors, refusals.

What each part's reader (`interop.dit`, `interop.unet`, `interop.vae`, `interop.text_encoder`,
`interop.scheduler`, and `interop.pipeline` for whole folders) builds on:
- `FolderError`, the one-line refusal every reader raises, and `ImportedTeacher`, what a
  teacher folder gives;
- `read_json`, `require`, `integer`, `integers`, `number`: a config file and its accepted
  values, refused by file and key; `pipeline_parts`: the parts a pipeline folder has and its
  model_index.json names;
- `check_layer_count`: a config's depth against the weights' headers, before anything is built;
- `read_safetensors`, `read_safetensors_shapes`, `weights_checksum`: a model folder's weight
  files (one file, or shards listed by an index), each checked by `safetensors_file`;
- `match_named_tensors`, `match_params`, `convert_params`: PyTorch tensors mapped onto our
  parameters by name and shape, every tensor used and every parameter found, or a refusal
  naming them;
- `abstract_params`, `loaded_like`: the one loading signature every network part has,
  `load(abstract, folder) -> params` (as big_vision's `load(init_params, init_file, ...)`):
  `abstract` is the parameter shapes of the module the caller built, `folder` the part's
  directory (unet/, vae/, transformer/, text_encoder/, ...); the result has `abstract`'s
  names and shapes, or the folder is refused. Each part's key mapping sits beside its `load`
  (`dit.load`, `unet.load`, `vae.load`, `sd3.load`, `text_encoder.load`, `sd3_text.load_clip`,
  `sd3_text.load_t5`). A caller checks a config's depth against the weights' headers
  (`check_layer_count`) before it traces the module's shapes, so a config claiming a million
  layers is refused, not traced;
- `model_config`: the schema's config.model with an import's keys.
No PyTorch: JSON and safetensors only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from distill_jax import config as config_lib
from distill_jax import trees
from distill_jax.safetensors_file import read_safetensors_file
from distill_jax.safetensors_file import read_safetensors_shapes as read_safetensors_shapes_file

PyTree = Any
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"


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


def text_to_image_teacher(
    folder: str,
    network: str,
    *,
    model: dict,
    schedule_record: dict,
    data_shape: tuple[int, int, int],
    configs_only: bool,
    **record_fields,
) -> ImportedTeacher:
    """The weightless ImportedTeacher of a text-to-image pipeline folder.

    Its network is in `folder`/`network` (unet/ or transformer/); `record_fields` are the
    reader's own (parts, text, vae, conventions, its class names). configs_only leaves the
    weights' checksum out (a plan before the download).
    """
    record = dict(
        source=folder,
        kind="text_to_image",
        weights_sha256=(None if configs_only else weights_checksum(os.path.join(folder, network))),
        **schedule_record,
        **record_fields,
    )
    return ImportedTeacher(
        model=model,
        logsnr_range=tuple(schedule_record["logsnr_range"]),
        data_shape=tuple(int(d) for d in data_shape),
        num_classes=0,
        params=None,
        record=record,
    )


def existing_folder(path) -> str:
    """`path` made absolute; FolderError unless it is a directory."""
    folder = os.path.abspath(os.fspath(path))
    if not os.path.isdir(folder):
        raise FolderError(f"{folder} is not a directory")
    return folder


NOT_READ = ("safety_checker", "feature_extractor", "image_encoder")  # not needed to distil


def named_parts(folder: str) -> tuple[str, ...]:
    """The parts a pipeline folder's model_index.json names, () without one.

    Its entries [library, class] that are not null, less the parts distillation does not read
    (NOT_READ). An index that is not a JSON object is refused in one line.
    """
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return ()
    index = read_json(index_path, "the pipeline index")
    return tuple(
        k
        for k, v in index.items()
        if not k.startswith("_")
        and isinstance(v, list)
        and v
        and v[0] is not None
        and k not in NOT_READ
    )


def pipeline_parts(
    folder: str, required: tuple[str, ...], optional: tuple[str, ...], pipeline_class: str
) -> tuple[str, ...]:
    """The parts of a pipeline folder: `required`, then the `optional` ones it has.

    Refused in one line: a part its model_index.json names that is neither (this reader cannot
    read it), and a required or named part whose folder is missing.
    """
    named = named_parts(folder)
    if unknown := [p for p in named if p not in required + optional]:
        raise FolderError(
            f"{folder} has parts distill_jax cannot read: {', '.join(unknown)} (named by its "
            f"model_index.json; accepted a {pipeline_class}'s {', '.join(required + optional)})"
        )
    wanted = tuple(dict.fromkeys(required + named))
    if missing := [p for p in wanted if not os.path.isdir(os.path.join(folder, p))]:
        raise FolderError(
            f"{folder} is not a complete {pipeline_class} folder: "
            f"{', '.join(p + '/' for p in missing)} missing (accepted: {', '.join(required)}, "
            f"and optionally {', '.join(optional)}, as {pipeline_class}.save_pretrained writes "
            "them)"
        )
    return required + tuple(p for p in optional if os.path.isdir(os.path.join(folder, p)))


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


def require(cfg: dict, key: str, accepted: tuple, where: str) -> None:
    """Refuse `cfg[key]` unless it is one of `accepted`, naming the file (`where`)."""
    if cfg.get(key) not in accepted:
        raise FolderError(
            f"{where} has {key}={cfg.get(key)!r}: accepted {', '.join(map(repr, accepted))}"
        )


def integer(cfg: dict, key: str, where: str, default=None, low: int = 1) -> int:
    """cfg[key] (`default` when absent) as an integer >= low; refuses anything else by name."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FolderError(f"{where} has {key}={value!r}: accepted an integer >= {low}")
    return value


def integers(cfg: dict, key: str, where: str, default=None, low: int = 1) -> tuple[int, ...]:
    """cfg[key] as a non-empty list of integers >= low (one integer is not a list)."""
    value = cfg.get(key, default)
    if (
        not isinstance(value, list | tuple)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value)
    ):
        raise FolderError(
            f"{where} has {key}={value!r}: accepted a non-empty list of integers >= {low}"
        )
    return tuple(value)


def number(cfg: dict, key: str, where: str, default=None, *, positive: bool = False) -> float:
    """cfg[key] as a finite number (> 0 when `positive`); refuses anything else by name."""
    value = cfg.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not math.isfinite(value) or (positive and value <= 0):
        accepted = "a positive finite number" if positive else "a finite number"
        raise FolderError(f"{where} has {key}={value!r}: accepted {accepted}")
    return float(value)


def count_layers(shapes: dict, prefix: str) -> int:
    """How many layers `prefix`N. the tensor names of a header hold (distinct N)."""
    return len({name[len(prefix) :].split(".")[0] for name in shapes if name.startswith(prefix)})


def check_layer_count(shapes: dict, prefix: str, claimed: int, key: str, where: str) -> None:
    """Refuse a config whose layer count (`key`) is not the weights' (from the headers alone).

    Before any module is built: a config claiming a million layers is refused, not traced.
    """
    held = count_layers(shapes, prefix)
    if claimed != held:
        raise FolderError(
            f"{where} has {key}={claimed} but the weights hold {held} ({prefix}N): accepted the "
            "weights' count"
        )


def _shards(index: str, error=FolderError) -> tuple[list[str], dict]:
    """(shard paths, weight_map) of a weights index: each shard a file beside the index."""
    weight_map = read_json(index, "the weights index").get("weight_map")
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) for v in weight_map.values())
    ):
        raise error(
            f"{index} has no weight_map of tensor names to shard files: accepted the index "
            "diffusers or transformers writes"
        )
    folder, paths = os.path.dirname(index), []
    for name in sorted(set(weight_map.values())):
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise error(
                f"{index} names the shard {name!r}, which is not a file beside it: accepted "
                f"file names in {folder}"
            )
        if not os.path.isfile(os.path.join(folder, name)):
            raise error(f"{index} names the shard {name}, which {folder} does not hold")
        paths.append(os.path.join(folder, name))
    return paths, weight_map


def read_sharded(index: str, read_file, error=FolderError) -> dict:
    """read_file(path) of every shard a weights index names, merged; a refusal names the file.

    Every tensor the index names must be in its shard's file.
    """
    paths, weight_map = _shards(index, error)
    merged = {}
    for path in paths:
        try:
            merged.update(read_file(path))
        except (OSError, ValueError) as failure:
            raise error(f"{path}: {failure}") from None
    if missing := sorted(set(weight_map) - set(merged)):
        raise error(f"{index} names tensors its shards lack ({', '.join(missing[:3])})")
    return merged


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        return _shards(index)[0]
    single = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(single):
        raise FolderError(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE})")
    return [single]


def _read_each_weight_file(folder: str, read_file) -> dict:
    """read_file(path) of every weight file of a model folder, merged; a refusal names it."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        return read_sharded(index, read_file)
    (single,) = _weight_files(folder)
    try:
        return read_file(single)
    except (OSError, ValueError) as error:
        raise FolderError(f"{single}: {error}") from None


def read_safetensors_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor of a model folder, from the files' headers alone."""
    return _read_each_weight_file(folder, read_safetensors_shapes_file)


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


def match_named_tensors(
    found: Mapping[str, Sequence[int]],
    wanted: Mapping[str, Sequence[int]],
    where: str,
    *,
    what: str,
    our_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] | None = None,
    hint: str | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Refuse unless `found` {name: PyTorch shape} holds exactly the tensors `wanted` names.

    `wanted` maps each tensor name to its expected shape: in our layout when `our_shape`
    (name, PyTorch shape -> that shape in our layout) is given, else PyTorch's. `hint` is added
    to the message when names are missing or left over.

    Raises:
      error: one line, '{where} does not hold {what} of its config.json's size: missing N (...);
        M not mapped (...)', or '{where}: tensor {name} has shape ..., which does not fit its
        config.json (expected ...)', the first misshapen tensor in `wanted`'s order.
    """
    missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    if missing or extra:
        parts = [f"missing {len(missing)} ({', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(extra)} not mapped ({', '.join(extra[:3])})"] if extra else []
        parts += [hint] if hint else []
        raise error(f"{where} does not hold {what} of its config.json's size: {'; '.join(parts)}")
    for name, want in wanted.items():
        shape = tuple(int(d) for d in found[name])
        got = shape if our_shape is None else tuple(our_shape(name, shape))
        if got != tuple(want):
            layout = "" if our_shape is None else " in our layout"
            raise error(
                f"{where}: tensor {name} has shape {shape}, which does not fit its config.json "
                f"(expected {tuple(want)}{layout})"
            )


def to_flax_layout(tensor: np.ndarray, flax_name: str, shape: tuple = ()) -> np.ndarray:
    """A PyTorch tensor in our layout: Linear [out, in] -> [in, out], Conv2d OIHW -> HWIO."""
    del shape  # kernels 2-D (Linear) or 4-D (Conv2d); a reader with others passes its own
    if flax_name.endswith("/kernel"):
        return tensor.T if tensor.ndim == 2 else tensor.transpose(2, 3, 1, 0)
    return tensor


def match_params(
    shapes: dict[str, Sequence[int]],
    abstract: PyTree,
    where: str,
    *,
    name_of,
    what: str,
    layout=to_flax_layout,
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
    try:
        wanted = {name_of(name): name for name in named}
    except KeyError as error:  # a module of another kind than the folder's
        raise FolderError(
            f"{where}: {error.args[0]}: accepted the weights of {what}, loaded for its module"
        ) from None

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


def abstract_params(module, *inputs) -> PyTree:
    """A Flax module's parameter shapes for `inputs` (jax.eval_shape of its init: no weights)."""
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]


def loaded_like(params: PyTree, abstract: PyTree, where: str, what: str, error=FolderError):
    """`params` when its names and shapes are `abstract`'s; else `error` naming a difference.

    The difference is a folder whose weights are not those of the module the caller built.
    """
    mismatch = trees.shape_mismatch(
        params, abstract, got_name=f"the weights in {where}", want_name=what
    )
    if mismatch:
        raise error(f"{mismatch}: accepted the weights of the {what} built for them")
    return params


def model_config(model_keys: dict) -> ml_collections.ConfigDict:
    """The schema's config.model with an import's keys applied."""
    model = config_lib.base_config().model
    for key, value in model_keys.items():
        if isinstance(value, dict):
            model[key].update(value)
        else:
            model[key] = value
    return model
