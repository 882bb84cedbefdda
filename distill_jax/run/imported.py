"""Teachers trained elsewhere: import a diffusers folder once into a run's `teacher/` stage.

`import_teacher(config, workdir, "diffusers:DIR")` reads the folder (`interop.pipeline`), takes
the network's config keys from it (the student architecture is the teacher's DiT plus the
guidance branch), clips the run's log-SNR range to the teacher's trained range, checks the
config's data against the network, and writes `workdir/teacher` as a finished stage: one Orbax
checkpoint (params = EMA params = the imported weights) and a FINISHED.json whose `imported`
entry records the source folder, the weights' sha256, the converted schedule, the conventions
and the config keys. A folder with vae/ (a latent pipeline) also makes the run a latent run:
its VAE is written first as the finished `autoencoder` stage, with the train split encoded at
the VAE's scaling_factor (`_import_vae`). The files a run reads of the folder afterwards
(configs, tokenizer, text encoder) are copied into `workdir/imported`: the workdir stands alone.
Everything is checked before anything is written; an interrupted import starts again when the
command is run again. Later commands on the workdir apply the recorded keys again
(`with_recorded_import`), so `distill`, `run`, `sample`, `evaluate` and `export` work on it
unchanged.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from distill_jax import checkpoints, config_checks, trees
from distill_jax.diffusion import discrete, flow
from distill_jax.interop import core as interop_core
from distill_jax.interop import pipeline
from distill_jax.interop import vae as vae_reader
from distill_jax.models import autoencoder, kinds
from distill_jax.run import latents as latents_lib
from distill_jax.run import workdir as workdir_lib
from distill_jax.run.run import Run

PREFIX = "diffusers:"


def with_import(
    config: ml_collections.ConfigDict,
    model_keys: dict,
    logsnr_range: tuple[float, float],
    record: dict | None = None,
) -> ml_collections.ConfigDict:
    """A copy of `config` that builds the imported network.

    Its log-SNR range is clipped to the teacher's trained range [lambda_{K-1}, lambda_0]. A
    text-to-image teacher (`record` with a 'text' entry) also makes the run a text run whose
    prompts and captions its own pipeline encodes (config.text.pipeline), at its length; one
    with a VAE (a 'vae' entry) makes it a latent run whose autoencoder is that VAE
    (config.autoencoder.pipeline).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    students = {  # the run's choices, not the folder's
        key: config.model[key]
        for key in ("student_parameterisation", "student_both_shift")
        if key in config.model
    }
    config.model = interop_core.model_config(model_keys)
    config.model.update(students)
    text = (record or {}).get("text")
    if text:
        config.text.enabled = True
        config.text.pipeline = str(record["source"])
        config.text.max_tokens = int(text["max_tokens"])
        if text.get("kind") == "sd3":  # CLIP's tokens, then T5's (the run's choice), then pooled
            length = int(config.text.get("max_sequence_length", 256))
            config.text.max_tokens = int(text["clip_tokens"]) + length + 1
    if (record or {}).get("vae"):  # a latent pipeline: its VAE is the run's autoencoder
        config.autoencoder.enabled = True
        config.autoencoder.pipeline = str(record["source"])
    lo, hi = logsnr_range
    config.diffusion.logsnr_min = max(float(config.diffusion.logsnr_min), float(lo))
    config.diffusion.logsnr_max = min(float(config.diffusion.logsnr_max), float(hi))
    return config


def with_recorded_import(
    config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> ml_collections.ConfigDict:
    """`config` with the model keys of the teacher imported into `workdir` (if one was).

    Raises:
      ValueError: none was, and the config's network comes only from an import
        (config.model.from_import).
    """
    record = (checkpoints.stage_finished(epath.Path(workdir).absolute() / "teacher") or {}).get(
        "imported"
    )
    if not record:
        if config is not None and config.model.get("from_import", False):
            raise ValueError(
                f"{workdir} has no imported teacher, and this config's network comes from one: "
                "add --teacher=diffusers:DIR (a diffusers pipeline folder with transformer/ or "
                "unet/ and scheduler/; docs/teachers.md)"
            )
        return config
    return with_import(config, record["model"], tuple(record["logsnr_range"]), record)


def teacher_times(run: Run, steps: int) -> np.ndarray:
    """The DDIM time grid [steps + 1] on which an imported teacher's own diffusers sampler steps.

    A discrete teacher's: diffusers' DDIMScheduler.set_timesteps(steps) with the teacher's
    timestep spacing and offset (`discrete.scheduler_timesteps`); a flow teacher's: the
    noise levels of FlowMatchEulerDiscreteScheduler.set_timesteps(steps) with its shift
    (`flow.scheduler_sigmas`), whose Euler steps are DDIM steps. Mapped to this run's times.

    Raises:
      ValueError: the run's teacher was not imported (its time is continuous).
    """
    record = (run.finished(run.stage("teacher")) or {}).get("imported")
    if not record:
        raise ValueError(
            f"{run.workdir} has no teacher imported from diffusers, so it has no timestep grid "
            "of its own: accepted grid='uniform' (t = i / N)."
        )
    schedule = record["schedule"]
    if schedule.get("kind") == "flow":
        sigmas = flow.scheduler_sigmas(
            steps,
            num_train_timesteps=int(schedule["num_train_timesteps"]),
            shift=float(schedule["shift"]),
            mu=_dynamic_shift_mu(run, schedule),
            time_shift_type=schedule.get("time_shift_type", "exponential"),
        )
        return flow.times_of_flow_sigmas(sigmas, **run.bounds)
    timesteps = discrete.scheduler_timesteps(
        steps,
        num_timesteps=int(schedule["num_train_timesteps"]),
        spacing=schedule.get("timestep_spacing", "leading"),
        steps_offset=int(schedule.get("steps_offset", 0)),
    )
    table = np.asarray(kinds.discrete_logsnrs(run.config.model))
    return discrete.times_of_timesteps(timesteps, table, **run.bounds)


def _dynamic_shift_mu(run: Run, schedule: dict) -> float | None:
    """A dynamically shifted flow's mu at the run's token count (None for a static shift).

    The tokens are the latent's patches, as diffusers' pipelines count them.
    """
    if not schedule.get("use_dynamic_shifting"):
        return None
    height, width = run.info.shape[:2]
    patch = kinds.MODEL_KINDS[str(run.config.model.kind)].patch_size(run.config.model)
    return flow.dynamic_shift_mu(
        (height // patch) * (width // patch),
        base_image_seq_len=int(schedule["base_image_seq_len"]),
        max_image_seq_len=int(schedule["max_image_seq_len"]),
        base_shift=float(schedule["base_shift"]),
        max_shift=float(schedule["max_shift"]),
    )


def _check_fits(run: Run, imported: interop_core.ImportedTeacher, source: str) -> None:
    """Refuse a config whose data the imported network cannot take."""
    if run.latent and not imported.record.get("vae"):
        raise ValueError(
            f"{source} is a pixel-space teacher but the config enables config.autoencoder "
            "(a latent run of distill_jax's own autoencoder): accepted autoencoder.enabled=False."
        )
    if tuple(run.info.shape) != tuple(imported.data_shape):
        what = "latents" if run.latent else "examples"
        theirs = f"{tuple(run.image_info.shape)}, latents {tuple(run.info.shape)} through the VAE"
        raise ValueError(
            f"{source} takes {what} of shape {imported.data_shape} but the config's data "
            f"{run.info.name!r} has {theirs if run.latent else tuple(run.info.shape)}: accepted "
            "a dataset (and data.image_size) of the teacher's shape."
        )
    if imported.record.get("kind") == "text_to_image":
        return
    if run.info.num_classes != imported.num_classes:
        raise ValueError(
            f"{source} has {imported.num_classes} classes (null class {imported.num_classes}) "
            f"but the config's data {run.info.name!r} has {run.info.num_classes}: accepted a "
            "dataset with the teacher's classes."
        )


IMPORTING_FILE = "IMPORTING.json"  # in a stage directory while an import writes it


def _existing_stage(workdir: epath.Path, name: str, weights_sha256: str) -> bool:
    """True when stage `name` holds these very weights, imported already; refuses others.

    `name` is 'teacher' or 'autoencoder' (a latent pipeline's VAE). What an interrupted import
    left (an unfinished stage marked IMPORTING_FILE) is removed, so the import starts again.
    """
    directory = workdir / name
    record = checkpoints.stage_finished(directory)
    if record is None:
        if (directory / IMPORTING_FILE).exists():
            logging.info("[%s] removing an interrupted import: %s", name, directory)
            directory.rmtree()
        elif directory.exists():
            raise ValueError(
                f"{directory} holds an unfinished {name}; --teacher=diffusers:DIR imports into "
                f"a workdir without one (delete that directory to import, or use a new workdir)."
            )
        return False
    theirs = (record.get("imported") or {}).get("weights_sha256")
    if theirs != weights_sha256:
        shown = (record.get("imported") or {}).get("source") or f"a {name} trained by distill_jax"
        raise ValueError(
            f"{workdir} already has another {name} ({shown}); --teacher=diffusers:DIR "
            "needs a new workdir, or this workdir's own teacher (omit --teacher)."
        )
    return True


def _start_import(run: Run, spec) -> None:
    """Mark stage `spec`'s directory as being imported into (see `_existing_stage`)."""
    directory = run.directory(spec)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / IMPORTING_FILE).write_text('{"note": "an import is writing this stage"}')


def _check_same_conventions(workdir: epath.Path, imported, folder: str) -> None:
    """Refuse a folder whose weights were imported already under other conventions.

    The network's config keys and the schedule are fixed at the import: a folder whose
    config.json or scheduler changed since (same weights) is refused, whatever
    --allow_config_change says, because the teacher's checkpoint was converted under the old.
    """
    record = (checkpoints.stage_finished(workdir / "teacher") or {}).get("imported") or {}
    theirs = dict(record.get("model") or {}, schedule=record.get("schedule"))
    ours = dict(imported.model, schedule=imported.record.get("schedule"))
    changed = [key for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
    if changed:
        shown = "; ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in changed[:3])
        raise ValueError(
            f"{folder} has the weights imported into {workdir} but other conventions ({shown}): "
            "an imported teacher keeps the conventions of its import; accepted the folder as it "
            "was imported, or a new --workdir for the changed one."
        )


def _import_vae(run: Run, vae: dict) -> None:
    """Write a latent pipeline's VAE as the run's finished autoencoder stage.

    Its weights go into one Orbax checkpoint; the train split is encoded once
    (`latents.encode_train_split`) and the latents recorded at the VAE's own scaling_factor
    and shift_factor, which the U-Net was trained on (the split's measured 1 / std is logged
    and recorded beside them, for data unlike the VAE's).
    """
    spec = run.stage("autoencoder")
    if _existing_stage(run.workdir, spec.name, vae["weights_sha256"]):
        return
    model, params, record = vae_reader.read_vae_folder(vae["source"])
    shift = float(record["shift_factor"] or 0.0)
    _start_import(run, spec)
    checkpointer = run.checkpointer(spec)
    try:
        checkpointer.save(0, {"params": params, "ema_params": params}, force=True)
        # The encoding pass holds the VAE's weights in config.train.frozen_dtype (the
        # checkpoint keeps them as read).
        encoding = trees.cast_floating(params, str(run.config.train.frozen_dtype))
        unscaled, _ = autoencoder.make_codec(model, encoding, 1.0, shift)
        shape, measured = latents_lib.encode_train_split(
            unscaled, run.config.data, run.directory(spec)
        )
        latents = latents_lib.Latents(float(record["scaling_factor"]), shape, shift)
        logging.info(
            "[autoencoder] imported %s: latents %s at scaling_factor %.5f (the encoded train "
            "split's 1 / std is %.5f)",
            vae["source"],
            "x".join(str(d) for d in shape),
            latents.scale,
            measured,
        )
        finished = {"stage": spec.name, **latents.to_record(), "imported": record}
        checkpointer.mark_finished(0, dict(finished, measured_scale=measured))
    finally:
        checkpointer.close()
    (run.directory(spec) / IMPORTING_FILE).unlink(missing_ok=True)


def _folder(teacher: str) -> str:
    """DIR of --teacher=diffusers:DIR; refuses anything else."""
    if not teacher.startswith(PREFIX) or len(teacher) == len(PREFIX):
        raise ValueError(
            f"--teacher={teacher!r} is not an import: accepted diffusers:DIR (a diffusers "
            "pipeline folder), or a finished teacher stage directory for `distill`."
        )
    return teacher[len(PREFIX) :]


def _check_text_data(config: ml_collections.ConfigDict, imported, folder: str) -> None:
    """Refuse a text-to-image teacher on data without captions."""
    text_to_image = imported.record.get("kind") == "text_to_image"
    if text_to_image and config.data.name not in config_checks.TEXT_DATASETS:
        raise ValueError(
            f"{folder} is a text-to-image teacher but the config's data {config.data.name!r} "
            f"has no captions: accepted data.name in {tuple(config_checks.TEXT_DATASETS)}."
        )


def plan_config(config: ml_collections.ConfigDict, teacher: str) -> ml_collections.ConfigDict:
    """`config` with the network of --teacher=diffusers:DIR, from the folder's JSON files alone.

    For `plan`: the weights need not be there yet (nothing is checksummed or written).
    """
    folder = _folder(teacher)
    imported = pipeline.read_teacher_folder(folder, weights=False, configs_only=True)
    _check_text_data(config, imported, folder)
    config = with_import(config, imported.model, imported.logsnr_range, imported.record)
    config.model.from_import = True  # the teacher is imported: no teacher training to plan
    return config


def _write_import(run: Run, imported: interop_core.ImportedTeacher) -> None:
    """Write the teacher stage (and a latent pipeline's VAE first) and the kept files."""
    imported = dataclasses.replace(imported, params=pipeline.read_teacher_weights(imported))
    spec = run.stage("teacher")
    record = dict(imported.record, model=imported.model)
    if imported.record.get("vae"):
        _import_vae(run, imported.record["vae"])
    _start_import(run, spec)
    checkpointer = run.checkpointer(spec)
    try:
        state = {"params": imported.params, "ema_params": imported.params}
        checkpointer.save(0, state, force=True)
        checkpointer.mark_finished(0, dict(run.finish_record(spec), imported=record))
    finally:
        checkpointer.close()
    (run.directory(spec) / IMPORTING_FILE).unlink(missing_ok=True)


def import_teacher(
    config: ml_collections.ConfigDict, workdir: epath.PathLike, teacher: str
) -> ml_collections.ConfigDict:
    """Import `teacher` ('diffusers:DIR') into workdir/teacher once; the run's config.

    Returns `config` with the imported network's keys. A latent pipeline's VAE becomes the
    run's finished autoencoder stage first (`_import_vae`); the files a run reads of the
    folder afterwards are copied into workdir/imported (`pipeline.copy_kept_files`), so the
    workdir stands alone. Importing the same weights again writes nothing; an import that was
    interrupted starts again.

    Raises:
      ValueError: an unsupported folder (`interop.core.FolderError`), a config that does
        not fit the network, a workdir that has another teacher, or the same weights under
        changed conventions; nothing is written then.
    """
    folder = _folder(teacher)
    # Configs and checksum first: a teacher imported already needs its tensors not read again.
    imported = pipeline.read_teacher_folder(folder, weights=False)
    _check_text_data(config, imported, folder)
    run_config = with_import(config, imported.model, imported.logsnr_range, imported.record)
    workdir = epath.Path(workdir).absolute()
    vae = imported.record.get("vae")
    if vae:  # refuses another or an unfinished autoencoder before anything is written
        _existing_stage(workdir, "autoencoder", vae["weights_sha256"])
    done = _existing_stage(workdir, "teacher", imported.record["weights_sha256"])
    if done:
        _check_same_conventions(workdir, imported, folder)
    else:
        run = Run.create(run_config, workdir)
        _check_fits(run, imported, folder)
        if imported.record.get("kind") == "text_to_image":  # its weights checked, not just read
            pipeline.text_encoder(
                imported.record["source"],
                int(config.text.clip_skip) or None,
                int(run_config.text.max_tokens),
            )
    kept = workdir / workdir_lib.IMPORTED_DIR
    with workdir_lib.locked(workdir):
        if not done:
            _write_import(run, imported)
        if not kept.exists():
            pipeline.copy_kept_files(imported.record["source"], kept)
        if not done:
            workdir_lib.record_config(workdir_lib.with_kept_files(run_config, workdir), workdir)
    if not done:  # the round trip through Orbax: what every later reader does
        run.load_params(run.stage("teacher"))
    return workdir_lib.with_kept_files(run_config, workdir)
