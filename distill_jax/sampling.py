"""Sampling from a run's workdir: the guided teacher and the distilled students.

`load_run(workdir)` reads workdir/config.json; `sample(run, model=..., steps=..., w=...)`
draws images:

- model='teacher': guided DDIM with `steps` steps, each one batched network call on the
  conditional and unconditional halves (2 network evaluations per sample and step);
  stochastic=True uses ancestral (DDPM) steps instead. With config.teacher.kind == 'exact_gmm'
  the teacher is the exact Gaussian-mixture denoiser.
- model='student': the student that samples in `steps` steps - the stage-two round with that N,
  or stage one's student at N = stage2.n_start - with deterministic DDIM or (stochastic=True)
  the distilled stochastic sampler. w must lie in the trained range [w_min, w_max].

Image-to-image: pass `init` (data in [-1, 1]) and t_start < 1; the sampler starts from `init`
noised to t_start. Inpainting: pass `init` and `mask` (1 = known pixel); the sampler starts
from noise and keeps the known pixels.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

from distill_jax import checkpoints
from distill_jax import config as config_lib
from distill_jax.data import sources
from distill_jax.diffusion import gmm, guidance, samplers
from distill_jax.models import denoiser
from distill_jax.training import distill, pipeline

MODELS = ("teacher", "student")
MASKS = ("left", "right", "top", "bottom", "center")


@dataclasses.dataclass
class Run:
    """A run's workdir with its recorded config and dataset info."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    info: sources.DatasetInfo

    @property
    def bounds(self) -> dict[str, float]:
        """The schedule's log-SNR clip, as keyword arguments for the samplers."""
        d = self.config.diffusion
        return dict(logsnr_min=float(d.logsnr_min), logsnr_max=float(d.logsnr_max))


def _with_defaults(recorded: dict, defaults: dict) -> dict:
    """`recorded` plus the keys it lacks from `defaults` (runs made before a key existed)."""
    merged = dict(recorded)
    for key, value in defaults.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _with_defaults(merged[key], value)
    return merged


def _tuples(tree: Any) -> Any:
    """JSON lists back to tuples (the config schema's sequence fields are tuples)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def load_run(
    workdir: str | pathlib.Path, *, eval_config: ml_collections.ConfigDict | None = None
) -> Run:
    """The run in `workdir` (config.json must exist); `eval_config` replaces config.eval.

    Keys the recorded config lacks (added to the schema after the run was made) take their
    `base_config` defaults.
    """
    workdir = pathlib.Path(workdir).absolute()
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a run directory (create one with "
            "`distill-jax run --config=... --workdir=...`)."
        )
    recorded = _with_defaults(json.loads(path.read_text()), config_lib.base_config().to_dict())
    config = ml_collections.ConfigDict(_tuples(recorded))
    if eval_config is not None:
        config.eval = ml_collections.ConfigDict(eval_config.to_dict())
    return Run(workdir, config, pipeline.dataset_info(config))


def student_directories(run: Run) -> dict[int, pathlib.Path]:
    """{N: stage directory} of every finished student: stage one at n_start, then each round."""
    found = {}
    stage1 = run.workdir / "stage1"
    if checkpoints.stage_finished(stage1) is not None:
        found[int(run.config.stage2.n_start)] = stage1
    for steps, _ in distill.round_schedule(run.config.stage2):
        directory = pipeline.round_directory(run.workdir, steps)
        if checkpoints.stage_finished(directory) is not None:
            found[steps] = directory
    return found


def model_directory(run: Run, model: str, steps: int) -> pathlib.Path | None:
    """The stage directory whose weights `model` at `steps` uses (None: exact GMM teacher)."""
    if model == "teacher":
        if run.config.teacher.kind == "exact_gmm":
            return None
        directory = run.workdir / "teacher"
        if checkpoints.stage_finished(directory) is None:
            raise FileNotFoundError(f"The teacher in {directory} has not finished training.")
        return directory
    if model != "student":
        raise ValueError(f"model={model!r} is invalid: accepted one of {MODELS}.")
    found = student_directories(run)
    if steps not in found:
        shown = ", ".join(str(n) for n in sorted(found)) or "none (run `distill-jax distill`)"
        raise ValueError(
            f"No finished student samples in {steps} steps in {run.workdir}; the step counts "
            f"that exist are: {shown}."
        )
    return found[steps]


def check_guidance(run: Run, w: float) -> None:
    """Fail unless the student was trained for guidance weight `w`."""
    low, high = float(run.config.guidance.w_min), float(run.config.guidance.w_max)
    if not low <= float(w) <= high:
        raise ValueError(
            f"Guidance weight {w} is outside the student's trained range [{low}, {high}] "
            "(config.guidance.w_min, w_max)."
        )


@dataclasses.dataclass(frozen=True)
class _GmmCond:
    """The exact mixture denoiser as cond_fn; the schedule bounds are static (hashed) data."""

    logsnr_min: float
    logsnr_max: float

    def __call__(self, mixture: gmm.GaussianMixture, z, t, labels):
        return gmm.gmm_xhat(
            mixture, z, t, labels, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max
        )


def denoise_fn(run: Run, model: str, steps: int) -> Partial:
    """The x-hat denoiser of the guided teacher or of the `steps`-step student (a Partial)."""
    directory = model_directory(run, model, steps)
    if model == "teacher":
        if directory is None:
            mixture = sources.gmm_from_config(run.config.data.gmm)
            cond_fn = Partial(_GmmCond(**run.bounds), mixture)
        else:
            net = pipeline.build_denoiser_model(run.config, run.info, use_guidance=False)
            params = checkpoints.restore_stage_params(directory, which="ema_params")
            cond_fn = denoiser.make_denoise_fn(net, params)
        return guidance.make_guided_denoise_fn(cond_fn, null_label=run.info.num_classes)
    net = pipeline.student_model(run.config, run.info)
    params = checkpoints.restore_stage_params(directory, which="ema_params")
    return denoiser.make_denoise_fn(net, params)


def evaluations_per_sample(model: str, steps: int) -> int:
    """Network evaluations per sample: 2 per step for the guided teacher, 1 for a student."""
    return 2 * steps if model == "teacher" else steps


def class_labels(num: int, num_classes: int, labels: list[int] | None = None) -> np.ndarray:
    """int32 [num]: `labels` cycled to `num`, or 0, 1, ..., K - 1, 0, 1, ... when None."""
    base = np.arange(num_classes) if not labels else np.asarray(labels)
    if base.min() < 0 or base.max() >= num_classes:
        raise ValueError(f"labels {list(base)} are invalid: accepted 0..{num_classes - 1}.")
    return np.resize(base, num).astype(np.int32)


def named_mask(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A [H, W, C] inpainting mask (1 = known) keeping the named part of the image."""
    if name not in MASKS:
        raise ValueError(f"mask={name!r} is invalid: accepted {MASKS} or an .npz file.")
    height, width = shape[0], shape[1]
    mask = np.zeros(shape, np.float32)
    if name == "left":
        mask[:, : width // 2] = 1
    elif name == "right":
        mask[:, width // 2 :] = 1
    elif name == "top":
        mask[: height // 2] = 1
    elif name == "bottom":
        mask[height // 2 :] = 1
    else:  # known border, unknown centre
        mask[:] = 1
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 0
    return mask


def sample(
    run: Run,
    *,
    model: str,
    steps: int,
    w: float,
    labels: np.ndarray,
    seed: int,
    stochastic: bool = False,
    init: np.ndarray | None = None,
    t_start: float = 1.0,
    mask: np.ndarray | None = None,
    batch_size: int = 250,
    fn: Partial | None = None,
) -> np.ndarray:
    """Draw len(labels) samples, float32 [N, *shape] in the data range ([-1, 1] for images).

    Args:
      run: the run (`load_run`).
      model: 'teacher' or 'student'.
      steps: sampling steps N (the student's N must be one a stage produced).
      w: guidance weight (the student's must be in [w_min, w_max]).
      labels: int [N] class labels.
      seed: seeds the starting noise and any sampler noise.
      stochastic: ancestral steps for the teacher, the distilled stochastic sampler for a student.
      init: [N, *shape] start images for image-to-image (t_start < 1) or inpainting (mask).
      t_start: image-to-image start time in (0, 1]; 1 without `init`.
      mask: [N or 1, *shape] inpainting mask, 1 = keep `init`'s pixel.
      batch_size: samples per sampler call (the last call is padded, so one compilation).
      fn: a denoise_fn to reuse (from `denoise_fn(run, model, steps)`), loaded if None.
    """
    if model == "student":
        check_guidance(run, w)
    if fn is None:
        fn = denoise_fn(run, model, steps)
    labels = np.asarray(labels, np.int32)
    num, shape = len(labels), tuple(run.info.shape)
    if init is not None and tuple(np.shape(init)) != (num, *shape):
        raise ValueError(f"init has shape {np.shape(init)}; expected {(num, *shape)}.")
    if mask is not None:
        if init is None:
            raise ValueError("Inpainting needs init images (the known pixels) with the mask.")
        mask = np.broadcast_to(np.asarray(mask, np.float32), (num, *shape))
    elif init is None and t_start != 1.0:
        raise ValueError("t_start < 1 (image-to-image) needs init images.")
    sampler = samplers.ddim_sample
    if stochastic:
        sampler = samplers.ancestral_sample if model == "teacher" else samplers.stochastic_sample
    key = jax.random.PRNGKey(seed)
    out = []
    batch_size = min(batch_size, num)
    for start in range(0, num, batch_size):
        chunk_key = jax.random.fold_in(key, start // batch_size)
        noise_key, init_key, sampler_key = jax.random.split(chunk_key, 3)
        stop = min(start + batch_size, num)

        def padded(a, stop=stop, start=start):
            a = np.asarray(a[start:stop])
            pad = batch_size - len(a)
            return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a

        z = jax.random.normal(noise_key, (batch_size, *shape), jnp.float32)
        kwargs = dict(steps=int(steps), **run.bounds)
        if init is not None and mask is None:
            kwargs["t_start"] = float(t_start)
            z = samplers.noise_to(padded(init), float(t_start), init_key, **run.bounds)
        if mask is not None:
            kwargs.update(known=padded(init), mask=padded(mask))
        if stochastic:
            x = sampler(fn, z, padded(labels), w, sampler_key, **kwargs)
        else:
            if mask is not None:
                kwargs["rng"] = sampler_key
            x = sampler(fn, z, padded(labels), w, **kwargs)
        out.append(np.asarray(x)[: stop - start])
    return np.concatenate(out).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] to uint8 in 0..255 (the inverse of the data preprocessing)."""
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images to float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def load_images(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Examples and labels from an .npz: (x float32 in [-1, 1], labels int32 or None).

    The file holds 'images' (uint8 [N, H, W, C]) or 'x' (float [N, ...] in the data range),
    and optionally 'labels'.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    with np.load(path) as data:
        if "images" in data:
            x = from_uint8(data["images"])
        elif "x" in data:
            x = np.asarray(data["x"], np.float32)
        else:
            raise ValueError(f"{path} has neither 'images' (uint8) nor 'x' (float) arrays.")
        labels = np.asarray(data["labels"], np.int32) if "labels" in data else None
    return x, labels


def _load_mask(mask: str, shape: tuple[int, ...]) -> np.ndarray:
    if mask in MASKS:
        return named_mask(mask, shape)
    with np.load(mask) as data:
        if "mask" not in data:
            raise ValueError(f"{mask} has no 'mask' array (1 = known pixel).")
        return np.asarray(data["mask"], np.float32)


def sample_to_files(
    workdir: str | pathlib.Path,
    *,
    model: str,
    steps: int,
    w: float,
    num: int,
    out: str | pathlib.Path,
    seed: int = 0,
    labels: list[int] | None = None,
    stochastic: bool = False,
    init: str | None = None,
    t_start: float = 1.0,
    mask: str | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Sample, write `out` (.npz) and a PNG picture beside it (.png); return both paths.

    The .npz holds 'images' uint8 [N, H, W, C] (vector data: 'x' float32 [N, D]) and
    'labels' int32 [N].

    With `init` (an .npz from `load_images`), one sample is drawn per init image, with the
    init's labels unless `labels` is given: image-to-image from t_start < 1, or inpainting
    with `mask` ('left', 'right', 'top', 'bottom', 'center' - the known part - or an .npz
    with a 'mask' array, 1 = known).
    """
    from distill_jax.evaluation import plots  # the evaluation package imports this module

    if model not in MODELS:
        raise ValueError(f"model={model!r} is invalid: accepted one of {MODELS}.")
    run = load_run(workdir)
    if stochastic and model == "student" and not run.config.stage2.stochastic:
        print(
            "note: these students were trained for deterministic sampling "
            "(config.stage2.stochastic=False); the stochastic sampler may do worse.",
            file=sys.stderr,
        )
    shape = tuple(run.info.shape)
    x_init = init_labels = mask_array = None
    if init is not None:
        x_init, init_labels = load_images(init)
        if x_init.shape[1:] != shape:
            raise ValueError(
                f"{init} holds examples of shape {x_init.shape[1:]}; the model's is {shape}."
            )
        num = len(x_init)
    if mask is not None:
        if init is None:
            raise ValueError("--mask (inpainting) needs --init images holding the known pixels.")
        mask_array = _load_mask(mask, shape)
    if num < 1:
        raise ValueError(f"num={num} is invalid: accepted an integer >= 1.")
    if labels:
        label_array = class_labels(num, run.info.num_classes, labels)
    elif init_labels is not None:
        label_array = init_labels
    else:
        label_array = class_labels(num, run.info.num_classes)
    x = sample(
        run,
        model=model,
        steps=steps,
        w=w,
        labels=label_array,
        seed=seed,
        stochastic=stochastic,
        init=x_init,
        t_start=t_start,
        mask=mask_array,
    )
    out = pathlib.Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"labels": label_array.astype(np.int32)}
    arrays["images" if len(shape) == 3 else "x"] = to_uint8(x) if len(shape) == 3 else x
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    picture = arrays.get("images", x)
    rows = int(np.bincount(label_array, minlength=run.info.num_classes).max())
    png = plots.save_samples_png(
        out.with_suffix(".png"),
        picture,
        label_array,
        run.info.num_classes,
        rows=min(rows, 16),
        title=f"{model} N={steps} w={w:g}",
    )
    return out, png
