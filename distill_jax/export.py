"""Export a distilled student as a self-contained sampler artifact (jax.export, no distill_jax).

`export_sampler(workdir, steps=N, out=DIR)` writes a directory that a serving process loads
with jax and numpy alone (its `run_sampler.py`, a copy of `distill_jax.export_loader`):

  sampler.jaxexport  jax.export serialization of the whole N-step sampler (every network call
                     and sampler step), a function
                     (noise [B, H, W, C] f32, labels [B] i32, w [B] f32[, rng u32[2]], *weights)
                     -> images [B, H, W, C] f32 clipped to the data range [-1, 1]; a text
                     run's takes conditions [B, L, 384] f32 in place of labels: the prompt's
                     all-MiniLM-L6-v2 token states, zero at padding (`TextEncoder.encode`),
                     embeddings rather than token ids, so the artifact carries no encoder
  weights.npz        the student's EMA weights, one array per parameter named by its path
                     ("Dense_0/kernel"), in the order metadata.json lists them
  metadata.json      format and version, image shape, classes, guidance range and schedule
                     (the per-step gains baked into the function), steps, sampler,
                     parameterisation, schedule bounds, input/output specs, sha256 checksums
  run_sampler.py     the loader: `load_exported(DIR)(noise, labels, w)` or a command line

The weights are arguments of the serialized function rather than constants inside it, so the
function stays small and a damaged weight file is caught by its own checksum. The batch size is
symbolic by default (any B >= 1 runs the one serialized function); pass `batch_size` to fix it.
The rng of a stochastic export is a raw threefry key, uint32[2] (jax.random.key_data).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.tree_util import Partial
from tqdm import tqdm

from distill_jax import export_loader, files, trees
from distill_jax.diffusion import samplers
from distill_jax.diffusion.guidance_schedule import CONSTANT, GuidanceSchedule
from distill_jax.models import denoiser
from distill_jax.run import Run, stages

PLATFORMS = ("cpu", "cuda", "tpu")
FUNCTION_FILE = "sampler.jaxexport"
WEIGHTS_FILE = "weights.npz"
LOADER_FILE = "run_sampler.py"


def _flat_weights(params: Any) -> tuple[list[str], list[np.ndarray], Any]:
    """Parameter names, float arrays and the treedef, in jax's flattening order."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [trees.leaf_name(path) for path, _ in with_path]
    arrays = [np.asarray(leaf) for _, leaf in with_path]
    for name, array in zip(names, arrays, strict=True):
        if array.dtype not in (np.float32, np.float16, np.float64, np.int32):
            raise ValueError(
                f"Parameter {name} has dtype {array.dtype}, which weights.npz cannot hold "
                "portably; export float32 weights."
            )
    return names, arrays, treedef


def _sampler_function(net, treedefs, decode, bounds: dict, gains: np.ndarray, stochastic: bool):
    """The jitted (noise, labels, w[, rng], *weights) -> images function that gets exported.

    `treedefs` are the student's and the decoder's weight structures; `decode` is the run's
    decoder (`Run.codec`), the identity on a pixel run, whose weights come after the student's.
    `gains` [steps] are the guidance schedule's gains: step k is guided with gains[k] * w.
    """
    steps = len(gains)
    sampler = "stochastic" if stochastic else "ddim"
    student_def, decoder_def = treedefs

    def sample_images(noise, conditions, w, *rest):
        rng, leaves = (rest[0], rest[1:]) if stochastic else (None, rest)
        count = student_def.num_leaves
        params = jax.tree_util.tree_unflatten(student_def, leaves[:count])
        fn = denoiser.make_denoise_fn(net, params)
        w_steps = jnp.asarray(gains)[:, None] * w[None, :]
        x = samplers.run_sampler(
            sampler, fn, noise, conditions, w_steps, rng, steps=steps, **bounds
        )
        decoder_args = jax.tree_util.tree_unflatten(decoder_def, leaves[count:])
        return jnp.clip(Partial(decode.func, *decoder_args)(x), -1.0, 1.0)

    return jax.jit(sample_images)


def _specs(
    shape: tuple[int, ...], batch: Any, stochastic: bool, condition: tuple[int, ...]
) -> list[jax.ShapeDtypeStruct]:
    """Input specs; `condition` is () for class labels, (L, 384) for text conditions."""
    specs = [
        jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
        jax.ShapeDtypeStruct((batch, *condition), jnp.float32 if condition else jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
    ]
    if stochastic:
        specs.append(jax.ShapeDtypeStruct((2,), jnp.uint32))
    return specs


MINILM_MEANING = (
    "the prompt's all-MiniLM-L6-v2 last-layer token states, zero at padding "
    "(distill_jax.text_encoder.TextEncoder.encode); the empty prompt's is unconditional"
)
PIPELINE_MEANING = (
    "the prompt's encoding by the teacher pipeline's text_encoder/ and tokenizer/ ({}), as "
    "StableDiffusionPipeline.encode_prompt computes it (distill_jax.interop.pipeline."
    "text_encoder); the empty prompt's is unconditional"
)
SD3_MEANING = (
    "the prompt's encoding by the teacher pipeline's three text encoders and tokenizers ({}), "
    "as StableDiffusion3Pipeline.encode_prompt computes it: prompt_embeds with "
    "pooled_prompt_embeds as one last row, zero-padded (distill_jax.models.mmdit."
    "pack_condition; distill_jax.interop.pipeline.text_encoder); the empty prompt's is "
    "unconditional"
)


def _condition_meaning(run: Run) -> str:
    """What an exported sampler's conditions are.

    An imported pipeline is named by its source folder's name and its network's sha256, not by
    a path on the importing machine.
    """
    if not run.config.text.pipeline:
        return MINILM_MEANING
    record = (run.finished(run.stage("teacher")) or {}).get("imported") or {}
    name = os.path.basename(str(record.get("source", ""))) or "the imported pipeline"
    source = f"the diffusers folder {name!r}, weights sha256 {record.get('weights_sha256')}"
    sd3 = (record.get("text") or {}).get("kind") == "sd3"
    return (SD3_MEANING if sd3 else PIPELINE_MEANING).format(source)


def _io_metadata(
    shape, noise_shape, batch: int | None, stochastic: bool, condition, meaning: str = ""
) -> dict:
    b = "B" if batch is None else batch
    labels = {"name": "labels", "shape": [b], "dtype": "int32", "meaning": "class in [0, classes)"}
    if condition:
        labels = {
            "name": "conditions",
            "shape": [b, *condition],
            "dtype": "float32",
            "meaning": meaning,
        }
    inputs = [
        {
            "name": "noise",
            "shape": [b, *noise_shape],
            "dtype": "float32",
            "meaning": "N(0, I) start of the sampler at t = 1 (latents on a latent run)",
        },
        labels,
        {"name": "w", "shape": [b], "dtype": "float32", "meaning": "guidance weight in range"},
    ]
    if stochastic:
        inputs.append(
            {
                "name": "rng",
                "shape": [2],
                "dtype": "uint32",
                "meaning": "threefry key: jax.random.key_data(jax.random.key(seed))",
            }
        )
    inputs.append({"name": "*weights", "meaning": "weights.npz arrays in weights.leaves order"})
    output = {"name": "images", "shape": [b, *shape], "dtype": "float32", "range": [-1.0, 1.0]}
    return {"inputs": inputs, "output": output}


def _condition_shape(run: Run) -> tuple[int, ...]:
    """() for a class-label run, (max_tokens, width) for a text run."""
    if not run.text:
        return ()
    return (int(run.config.text.max_tokens), stages.text_width(run.config))


def _sha256(path: epath.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_arguments(platforms: Sequence[str], batch_size: int | None, out: epath.Path, overwrite):
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ValueError(
            f"platforms={tuple(platforms)!r} is invalid: accepted some of {PLATFORMS}."
        )
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid: accepted None or an integer >= 1.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass overwrite=True.")
    if out.exists() and not _is_artifact(out):
        raise FileExistsError(
            f"{out} exists and is not a distill_jax sampler artifact (no metadata.json of format "
            f"{export_loader.FORMAT!r}); --overwrite only replaces an earlier export."
        )


def _is_artifact(directory: epath.Path) -> bool:
    """Whether `directory` holds an exported sampler (so replacing it loses nothing else)."""
    try:
        metadata = json.loads((directory / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("format") == export_loader.FORMAT


def _latent_entry(run: Run) -> dict | None:
    """metadata.json's 'latent': the scale (and an imported VAE's shift) of a latent run."""
    if not run.latent:
        return None
    latents = run.latents()
    entry = {"scale": latents.scale}
    if latents.shift:
        entry["shift"] = latents.shift
    return entry


def _metadata(
    run: Run, spec, exported, *, batch_size, stochastic, schedule, arrays, names, staging
):
    """metadata.json's content (see the module docstring)."""
    config, shape = run.config, tuple(int(d) for d in run.image_info.shape)
    noise_shape = tuple(int(d) for d in run.info.shape)
    return {
        "format": export_loader.FORMAT,
        "format_version": export_loader.FORMAT_VERSION,
        "image_shape": list(shape),
        "noise_shape": list(noise_shape),
        "latent": _latent_entry(run),
        "num_classes": int(run.info.num_classes),
        "guidance": {"w_min": float(config.guidance.w_min), "w_max": float(config.guidance.w_max)},
        "guidance_schedule": {
            "name": schedule.name,
            "gains": schedule.weights(1.0, steps=int(spec.steps)).tolist(),
            "meaning": "step k (first step first) is guided with gains[k] * w",
        },
        "steps": int(spec.steps),
        "stochastic": bool(stochastic),
        "sampler": "stochastic" if stochastic else "ddim",
        "student_trained_stochastic": bool(config.stage2.stochastic),
        "batch_size": None if batch_size is None else int(batch_size),
        "parameterisation": run.model(spec).parameterisation,
        "schedule": {"kind": "cosine_logsnr", **run.bounds},
        "data_range": [-1.0, 1.0],
        "condition_shape": list(_condition_shape(run)),
        **_io_metadata(
            shape,
            noise_shape,
            batch_size,
            stochastic,
            _condition_shape(run),
            _condition_meaning(run),
        ),
        "platforms": list(exported.platforms),
        "function": {
            "file": FUNCTION_FILE,
            "sha256": _sha256(staging / FUNCTION_FILE),
            "calling_convention_version": exported.calling_convention_version,
        },
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": _sha256(staging / WEIGHTS_FILE),
            "count": int(sum(a.size for a in arrays)),
            "leaves": [
                {"name": n, "shape": list(a.shape), "dtype": str(a.dtype)}
                for n, a in zip(names, arrays, strict=True)
            ],
        },
        "source": {
            "workdir": str(run.workdir),
            "stage": spec.name,
            "dataset": config.data.name,
            "jax_version": jax.__version__,
        },
    }


def _student_weights(run: Run, spec) -> tuple[list[str], list[np.ndarray], tuple, Partial]:
    """The student's and (latent runs) the decoder's weights: names, arrays, treedefs, decode."""
    names, arrays, treedef = _flat_weights(run.load_params(spec))
    _, decode = run.codec()  # a latent run's sampler ends in its decoder
    decoder_names, decoder_arrays, decoder_def = _flat_weights(decode.args)
    names += [f"autoencoder/{name}" for name in decoder_names]
    return names, arrays + decoder_arrays, (treedef, decoder_def), decode


def _image_student(run: Run, steps: int):
    """The run's finished `steps`-step student; refuses a run that is not on images."""
    shape = tuple(int(d) for d in run.info.shape)
    if len(shape) != 3:
        raise ValueError(f"Only image students [H, W, C] can be exported; this run has {shape}.")
    return run.student(steps)


def export_sampler(
    workdir: epath.PathLike,
    *,
    steps: int,
    out: epath.PathLike,
    stochastic: bool = False,
    batch_size: int | None = None,
    platforms: Sequence[str] = PLATFORMS,
    overwrite: bool = False,
    schedule: GuidanceSchedule = CONSTANT,
    progress: bool = False,
) -> dict:
    """Write the `steps`-step student of `workdir` as a sampler artifact directory at `out`.

    Args:
      workdir: a run directory with a finished student for `steps` (a stage-two round, or
        stage one at stage2.n_start).
      steps: the student's number of sampling steps N.
      out: the artifact directory to create (see the module docstring for its files).
      stochastic: export the distilled stochastic sampler (takes an rng) instead of DDIM.
      batch_size: None for a symbolic batch (any B >= 1), else the one batch size accepted.
      platforms: the backends the serialized function is lowered for (any of cpu, cuda, tpu;
        lowering needs no such device).
      overwrite: replace an existing `out` that holds an earlier export (never anything else).
      schedule: the guidance schedule baked into the sampler (`guidance_schedule`): the
        exported function still takes one w per example, and guides step k with gain_k * w.
      progress: show the phases (restore, lower, write) as a progress bar on stderr (tqdm).

    Returns:
      The metadata written to out/metadata.json.

    Raises:
      ValueError: no finished student with `steps`, a bad batch size or platform.
      FileExistsError: `out` exists and overwrite is False, or it is not an artifact.
    """
    out = epath.Path(out).absolute()
    _check_arguments(platforms, batch_size, out, overwrite)
    run = Run.open(workdir)
    spec = _image_student(run, int(steps))
    bar = tqdm(total=3, unit="phase", desc="export: restoring weights", disable=not progress)
    names, arrays, treedefs, decode = _student_weights(run, spec)
    bar.update()
    bar.set_description(f"export: lowering for {', '.join(platforms)}")
    gains = schedule.weights(1.0, steps=int(steps))
    function = _sampler_function(run.model(spec), treedefs, decode, run.bounds, gains, stochastic)
    exported = _lower(run, function, arrays, batch_size, platforms, stochastic)
    bar.update()
    bar.set_description("export: writing")
    details = dict(batch_size=batch_size, stochastic=stochastic, schedule=schedule)
    with files.atomic_directory(out, replace=overwrite) as staging:
        _write_files(staging, exported, names, arrays)
        metadata = _metadata(
            run, spec, exported, arrays=arrays, names=names, staging=staging, **details
        )
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2))
    bar.update()
    bar.close()
    return metadata


def _lower(run: Run, function, arrays, batch_size, platforms, stochastic):
    """`function` lowered for `platforms` (jax.export), at batch_size or a symbolic batch B."""
    shape = tuple(int(d) for d in run.info.shape)
    (batch,) = jax.export.symbolic_shape("B") if batch_size is None else (int(batch_size),)
    weight_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
    return jax.export.export(function, platforms=tuple(platforms))(
        *_specs(shape, batch, stochastic, _condition_shape(run)), *weight_specs
    )


def _write_files(staging: epath.Path, exported, names, arrays) -> None:
    """The serialized function, the weights and the loader, into the artifact's `staging`."""
    (staging / FUNCTION_FILE).write_bytes(exported.serialize())
    with (staging / WEIGHTS_FILE).open("wb") as handle:
        np.savez(handle, **dict(zip(names, arrays, strict=True)))
    (staging / LOADER_FILE).write_text(epath.Path(export_loader.__file__).read_text())
