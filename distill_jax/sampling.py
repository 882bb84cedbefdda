"""Sampling from a run's workdir: the guided teacher and the distilled students.

`Run.open(workdir)` (the run layer) reads a run; `sample(run, model=..., steps=..., w=...)`
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

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.tree_util import Partial
from tqdm import tqdm

from distill_jax import files, images
from distill_jax.diffusion import samplers
from distill_jax.diffusion.guidance_schedule import (
    CONSTANT,
    GuidanceSchedule,
    guided_evaluations,
)
from distill_jax.run import Run, imported
from distill_jax.run import prompts as prompt_lib

MODELS = ("teacher", "student")
# The time grid of a sampler: t = i / N, or an imported teacher's own discrete timesteps.
GRIDS = ("uniform", "teacher")
# Bytes of memory per sample value while `sample_to_files` runs: the float32 samples, the float
# temporaries of converting them to uint8, and the uint8 images of the .npz and the picture.
MEMORY_PER_VALUE = 10


def in_trained_range(run: Run, weights: np.ndarray | float) -> bool:
    """Whether every weight lies in the students' trained range [w_min, w_max]."""
    low, high = float(run.config.guidance.w_min), float(run.config.guidance.w_max)
    weights = np.asarray(weights, np.float64)
    return bool(np.all((weights >= low) & (weights <= high)))


def check_guidance(run: Run, weights: np.ndarray | float, schedule: str = "constant") -> None:
    """Fail unless the student was trained for every guidance weight in `weights`.

    `weights` is a weight or the per-step weights of `schedule` (named in the message).
    """
    if in_trained_range(run, weights):
        return
    low, high = float(run.config.guidance.w_min), float(run.config.guidance.w_max)
    weights = np.atleast_1d(np.asarray(weights, np.float64))
    what = f"Guidance weight {weights[0]:g} is"
    if weights.size > 1 or schedule != "constant":
        what = (
            f"Guidance schedule {schedule} gives per-step weights {weights.min():g}.."
            f"{weights.max():g}, partly"
        )
    raise ValueError(
        f"{what} outside the student's trained range [{low:g}, {high:g}] "
        "(config.guidance.w_min, w_max)."
    )


def unguided_steps(weights: np.ndarray) -> str:
    """'none', 'some' or 'all': how many of the per-step `weights` are 0."""
    zero = np.asarray(weights) == 0
    return "all" if np.all(zero) else "some" if np.any(zero) else "none"


def denoise_fn(
    run: Run,
    model: str,
    steps: int,
    *,
    weights: np.ndarray | None = None,
    null: np.ndarray | None = None,
) -> Partial:
    """The x-hat denoiser of the guided teacher or of the `steps`-step student (a Partial).

    weights: the per-step guidance weights the teacher will be called with; its steps with
    w = 0 then evaluate only the conditional half (`unguided_steps`). None: guided everywhere.
    null: the teacher's unconditional input (a negative prompt's encoding); default the run's.
    """
    if model == "teacher":
        mode = "none" if weights is None else unguided_steps(weights)
        return run.guided_teacher_fn(unguided_steps=mode, null=null)
    if model != "student":
        raise ValueError(f"model={model!r} is invalid: accepted one of {MODELS}.")
    return run.denoise_fn(run.student(steps))


def evaluations_per_sample(model: str, steps: int, weights: np.ndarray | None = None) -> int:
    """Network evaluations per sample of `steps` steps.

    1 per step for a student; 2 per step for the guided teacher, 1 at a step whose weight is 0
    when its per-step `weights` are given.
    """
    if model != "teacher":
        return steps
    return 2 * steps if weights is None else guided_evaluations(weights)


def _checked_labels(labels, num_classes: int, *, source: str = "labels") -> np.ndarray:
    """int32 labels, failing unless every one is a class in 0..K-1."""
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{source} holds labels {sorted(set(bad.tolist()))[:5]} outside the classes: "
            f"accepted 0..{num_classes - 1}."
        )
    return labels.astype(np.int32)


def class_labels(num: int, num_classes: int, labels: list[int] | None = None) -> np.ndarray:
    """int32 [num]: `labels` cycled to `num`, or 0, 1, ..., K - 1, 0, 1, ... when None."""
    base = np.arange(num_classes) if not labels else _checked_labels(labels, num_classes)
    return np.resize(base, num).astype(np.int32)


def _check_inputs(run: Run, num: int, init, t_start: float, mask) -> np.ndarray | None:
    """Validate the image-to-image / inpainting inputs; the mask broadcast to [N, *shape]."""
    shape = tuple(run.image_info.shape)
    if init is not None and tuple(np.shape(init)) != (num, *shape):
        raise ValueError(f"init has shape {np.shape(init)}; expected {(num, *shape)}.")
    if mask is not None:
        if init is None:
            raise ValueError("Inpainting needs init images (the known pixels) with the mask.")
        if run.latent:
            raise ValueError(
                "Inpainting (--mask) works on pixel runs only: a latent run's sampler cannot "
                "keep known pixels. Image-to-image (--init with --t_start) works on both."
            )
        return np.broadcast_to(np.asarray(mask, np.float32), (num, *shape))
    if init is None and t_start != 1.0:
        raise ValueError("t_start < 1 (image-to-image) needs init images.")
    return None


def _padded(a: np.ndarray, start: int, stop: int, size: int) -> np.ndarray:
    """a[start:stop] padded to `size` rows by repeating its last row."""
    a = np.asarray(a[start:stop])
    pad = size - len(a)
    return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a


def _sample_chunk(
    run, fn, sampler, conditions, w, key, *, steps, init, t_start, mask, times
) -> jax.Array:
    """One padded batch: start noise (or noised init), then the sampler."""
    noise_key, init_key, sampler_key = jax.random.split(key, 3)
    z = jax.random.normal(noise_key, (len(conditions), *run.info.shape), jnp.float32)
    kwargs = dict(steps=int(steps), times=times, **run.bounds)
    if init is not None and mask is None:
        kwargs["t_start"] = float(t_start)
        z = samplers.noise_to(init, float(t_start), init_key, **run.bounds)
    if mask is not None:
        kwargs.update(known=init, mask=mask)
    # run_sampler drops the key where its sampler needs none (plain DDIM).
    return samplers.run_sampler(sampler, fn, z, conditions, w, sampler_key, **kwargs)


def _time_grid(run: Run, grid: str, model: str, sampler: str, init, steps: int):
    """None for t = i / N, or the imported teacher's own DDIM grid (grid='teacher')."""
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is invalid: accepted one of {GRIDS}.")
    if grid == "uniform":
        return None
    if model != "teacher" or sampler != "ddim" or init is not None:
        raise ValueError(
            "grid='teacher' (the imported teacher's own timesteps) is accepted for the teacher's "
            "deterministic DDIM from noise only (model='teacher', no --stochastic or --init)."
        )
    return imported.teacher_times(run, int(steps))


def sample(
    run: Run,
    *,
    model: str,
    steps: int,
    w: float,
    conditions: np.ndarray,
    seed: int,
    stochastic: bool = False,
    init: np.ndarray | None = None,
    t_start: float = 1.0,
    mask: np.ndarray | None = None,
    batch_size: int = 250,
    fn: Partial | None = None,
    schedule: GuidanceSchedule = CONSTANT,
    progress: bool = False,
    grid: str = "uniform",
    null: np.ndarray | None = None,
) -> np.ndarray:
    """Draw len(conditions) samples, float32 [N, *shape] in the data range ([-1, 1] for images).

    On a latent run the sampler runs on latents and the samples are decoded: the result has
    the images' shape (`run.image_info.shape`), as have `init` and `mask`.

    Args:
      run: the run (`Run.open`).
      model: 'teacher' or 'student'.
      steps: sampling steps N (the student's N must be one a stage produced).
      w: guidance weight (the student's must be in [w_min, w_max]).
      conditions: int [N] class labels, or a text run's conditions [N, L, 384] (`run.prompts`).
      seed: seeds the starting noise and any sampler noise.
      stochastic: ancestral steps for the teacher, the distilled stochastic sampler for a student.
      init: [N, *shape] start images for image-to-image (t_start < 1) or inpainting (mask).
      t_start: image-to-image start time in (0, 1]; 1 without `init`.
      mask: [N or 1, *shape] inpainting mask, 1 = keep `init`'s pixel.
      batch_size: samples per sampler call (the last call is padded, so one compilation).
      fn: a denoise_fn to reuse (from `denoise_fn(run, model, steps)`), loaded if None.
      schedule: how w varies over the steps (`guidance_schedule`); constant by default.
      progress: show a progress bar with an ETA on stderr (tqdm), one tick per batch.
      grid: 'uniform' (t = i / N) or 'teacher': an imported teacher's own diffusers DDIM
        timesteps (`imported.teacher_times`; DDIM from pure noise only).
      null: the teacher's unconditional input (a negative prompt's `negative_condition`).
    """
    fn, sampler, weights = _guided_call(
        run, model, steps, w, schedule, t_start, stochastic, fn, null
    )
    conditions, init, mask, batch_size = _start(run, conditions, init, mask, t_start, batch_size)
    times = _time_grid(run, grid, model, sampler, init, steps)
    num = len(conditions)
    bar = tqdm(total=num, unit="sample", desc=f"{model} N={steps}", disable=not progress)
    chunk_args = dict(steps=steps, t_start=t_start, times=times)
    out = _sample_batches(
        run,
        (fn, sampler, weights[:, None]),
        conditions,
        init,
        mask,
        seed,
        batch_size,
        bar,
        chunk_args,
    )
    bar.close()
    return out


def _start(run, conditions, init, mask, t_start: float, batch_size: int) -> tuple:
    """`sample`'s inputs checked: (conditions, init encoded (or None), mask, batch size)."""
    conditions = np.asarray(conditions).astype(np.float32 if run.text else np.int32)
    mask = _check_inputs(run, len(conditions), init, t_start, mask)
    batch_size = min(batch_size, len(conditions))
    if init is not None:
        init = apply_in_batches(run.codec()[0], np.asarray(init, np.float32), batch_size)
    return conditions, init, mask, batch_size


def _guided_call(run, model, steps, w, schedule, t_start, stochastic, fn, null):
    """`sample`'s w checked: (denoise_fn, given or built; sampler name; weights [steps])."""
    if not np.isfinite(w):
        raise ValueError(f"guidance weight w={w} is invalid: accepted a finite number.")
    weights = schedule.weights(w, steps=int(steps), t_start=float(t_start))
    if model == "student":
        check_guidance(run, weights, schedule.name)
    sampler = "ddim"
    if stochastic:
        sampler = "ancestral" if model == "teacher" else "stochastic"
    if fn is None:
        fn = denoise_fn(run, model, steps, weights=weights, null=null)
    return fn, sampler, weights


def _sample_batches(run, call, conditions, init, mask, seed, batch_size, bar, chunk_args):
    """`sample`'s loop: padded batches of `batch_size`, decoded, into one float32 array."""
    fn, sampler, weights = call
    key, num, decode = jax.random.PRNGKey(seed), len(conditions), run.codec()[1]
    out = None
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        chunk = functools.partial(_padded, start=start, stop=stop, size=batch_size)
        x = _sample_chunk(
            run,
            fn,
            sampler,
            chunk(conditions),
            weights,
            jax.random.fold_in(key, start // batch_size),
            init=None if init is None else chunk(init),
            mask=None if mask is None else chunk(mask),
            **chunk_args,
        )
        batch = np.asarray(_apply(decode, x), np.float32)[: stop - start]
        if out is None:  # filled in place: no second copy of all the samples
            out = np.empty((num, *batch.shape[1:]), np.float32)
        out[start:stop] = batch
        bar.update(stop - start)
    return out


@jax.jit
def _apply(fn: Partial, x: jax.Array) -> jax.Array:
    """fn(x) compiled once per (fn's static part, shape): the run's encoder or decoder."""
    return fn(x)


def apply_in_batches(fn: Partial, x: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over x in padded batches of `batch_size` (one compiled shape)."""
    out = []
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        out.append(np.asarray(_apply(fn, _padded(x, start, stop, batch_size)))[: stop - start])
    return np.concatenate(out)


def _sample_inputs(run: Run, num: int, labels, init, mask):
    """(labels [N], init x or None, mask or None) for `sample_to_files`, checked.

    On a text run the labels returned are the init's (if any, ignored by the caller).
    """
    shape = tuple(run.image_info.shape)
    x_init = init_labels = mask_array = None
    if init is not None:
        x_init, init_labels = images.load_images(init)
        if x_init.shape[1:] != shape:
            raise ValueError(
                f"{init} holds examples of shape {x_init.shape[1:]}; the model's is {shape}."
            )
        num = len(x_init)
    if mask is not None:
        if init is None:
            raise ValueError("--mask (inpainting) needs --init images holding the known pixels.")
        mask_array = images.load_mask(mask, shape, num)
    if num < 1:
        raise ValueError(f"num={num} is invalid: accepted an integer >= 1.")
    if run.text:
        label_array = np.zeros((num,), np.int32)
    elif labels:
        label_array = class_labels(num, run.info.num_classes, labels)
    elif init_labels is not None:
        label_array = _checked_labels(init_labels, run.info.num_classes, source=str(init))
    else:
        label_array = class_labels(num, run.info.num_classes)
    return label_array, x_init, mask_array


def check_output_fits(run: Run, num: int, out: epath.PathLike) -> None:
    """Refuse, before sampling, `num` samples that would not fit in memory or on `out`'s disk.

    Raises ValueError naming the size needed and the size free.
    """
    values = num * math.prod(run.image_info.shape)
    image_data = len(run.image_info.shape) == 3
    shape = "x".join(str(d) for d in run.image_info.shape)
    files.check_room(
        f"num={num} (samples of {shape})",
        memory=values * MEMORY_PER_VALUE,
        disk=values * (1 if image_data else 4) + 4 * num,
        path=out,
    )


def _write_samples(
    run: Run, x: np.ndarray, labels: np.ndarray, out: epath.PathLike, title: str, prompts=None
):
    """The .npz (images uint8 or vectors x, labels) and its PNG picture; both paths.

    `out` gains the suffix .npz if it has another. With `prompts` (a text run) `labels` index
    them, the .npz holds 'prompts' and 'prompt_index', and the picture has one column per prompt.
    """
    out = epath.Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    image_data = len(run.image_info.shape) == 3
    columns = len(prompts) if prompts else run.info.num_classes
    arrays = {"prompt_index" if prompts else "labels": labels.astype(np.int32)}
    if prompts:
        arrays["prompts"] = np.asarray(prompts, dtype=str)
    arrays["images" if image_data else "x"] = images.to_uint8(x) if image_data else x
    with files.atomic_path(out) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)
    rows = int(np.bincount(labels, minlength=columns).max())
    png = images.save_samples_png(
        out.with_suffix(".png"),
        images.displayable(x),
        labels,
        columns,
        rows=min(rows, 16),
        title=title,
    )
    return out, png


def negative_condition(run: Run, model: str, negative_prompt: str | None) -> np.ndarray | None:
    """The encoding [L, D] of a negative prompt for the teacher's guidance (None: none given).

    Raises:
      ValueError: a negative prompt for a class-label run or for a student (whose guidance
        was distilled against the empty prompt, so it takes none).
    """
    if negative_prompt is None:
        return None
    if not run.text:
        raise ValueError(
            "--negative_prompt needs a text run (config.text.enabled); this run conditions "
            "on class labels, whose unconditional input is the null class."
        )
    if model != "teacher":
        raise ValueError(
            "--negative_prompt applies to --model=teacher only: a distilled student learnt "
            "guidance against the empty prompt and takes no negative prompt."
        )
    return prompt_lib.encode_prompts(run, [negative_prompt])[0]


def _open_for(workdir, model: str, stochastic: bool, negative_prompt: str | None):
    """(run, null) for `sample_to_files`: the model name checked, a negative prompt encoded."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is invalid: accepted one of {MODELS}.")
    run = Run.open(workdir)
    null = negative_condition(run, model, negative_prompt)
    if stochastic and model == "student" and not run.config.stage2.stochastic:
        logging.warning(
            "these students were trained for deterministic sampling "
            "(config.stage2.stochastic=False); the stochastic sampler may do worse."
        )
    return run, null


def sample_to_files(
    workdir: epath.PathLike,
    *,
    model: str,
    steps: int,
    w: float,
    num: int,
    out: epath.PathLike,
    seed: int = 0,
    labels: list[int] | None = None,
    stochastic: bool = False,
    init: str | None = None,
    t_start: float = 1.0,
    mask: str | None = None,
    schedule: GuidanceSchedule = CONSTANT,
    prompts: list[str] | None = None,
    grid: str = "uniform",
    negative_prompt: str | None = None,
) -> tuple[epath.Path, epath.Path]:
    """Sample, write `out` (.npz) and a PNG picture beside it (.png); return both paths.

    The .npz holds 'images' uint8 [N, H, W, C] (vector data: 'x' float32 [N, D]) and 'labels'
    int32 [N], or on a text run 'prompts' and 'prompt_index' [N] (`prompts` cycled to N, by
    default one per digit; `negative_prompt` replaces the empty one in the teacher's guidance).
    With `init` (an .npz for `images.load_images`) one sample is drawn per init image, with its
    labels unless `labels` is given: image-to-image from t_start < 1, or inpainting with `mask`
    ('left', 'right', 'top', 'bottom', 'center' - the known part - or an .npz 'mask', 1 = known).
    """
    run, null = _open_for(workdir, model, stochastic, negative_prompt)
    prompt_lib.check_condition_kind(run, prompts=prompts, labels=labels)
    if init is None:  # before the labels exist: a huge num is refused here, not by numpy
        check_output_fits(run, num, out)
    label_array, x_init, mask_array = _sample_inputs(run, num, labels, init, mask)
    if init is not None:
        check_output_fits(run, len(label_array), out)
    conditions = label_array
    if run.text:
        prompts, label_array, conditions = prompt_lib.prompt_conditions(
            run, prompts, len(label_array)
        )
    x = sample(
        run,
        model=model,
        steps=steps,
        w=w,
        conditions=conditions,
        seed=seed,
        stochastic=stochastic,
        init=x_init,
        t_start=t_start,
        mask=mask_array,
        schedule=schedule,
        progress=True,
        grid=grid,
        null=null,
    )
    title = f"{model} N={steps} w={w:g}"
    title += "" if schedule.kind == "constant" else f" {schedule.name}"
    return _write_samples(run, x, label_array, out, title, prompts if run.text else None)
