"""The training drivers: one builder per stage kind, and the functions the CLI and notebooks call.

Every stage is trained the same way: the run layer says which stages exist and which one is a
stage's teacher (`Run.stages`); `BUILDERS[kind](run, spec, teacher_state)` turns a stage into
the loop's `Stage` (loss, initial parameters, optimiser); `loop.run_stage` trains it. A new
trainable stage kind is one entry in the run layer's registry and one builder here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from distill_jax import parallel
from distill_jax.models import denoiser, student_head
from distill_jax.models.autoencoder import make_codec
from distill_jax.run import Latents, Run, StageSpec
from distill_jax.run.latents import encode_train_split
from distill_jax.training import autoencoder, distill, loop, teacher

PyTree = Any


def _stage(run: Run, spec: StageSpec, loss_fn, init_params, teacher: PyTree = None):
    """The loop's Stage: batch size and optimiser from the stage kind's config section.

    A final halving round takes its peak learning rate from `stage2.final_learning_rate`
    where that is set (> 0).
    """
    section = run.config[spec.stage_kind.section]
    optimizer = section.optimizer
    if spec.final_round and float(section.final_learning_rate) > 0:
        optimizer = optimizer.copy_and_resolve_references()
        optimizer.learning_rate = float(section.final_learning_rate)
    networked = spec.teacher is not None and run.stage(spec.teacher).stage_kind.model is not None
    return loop.Stage(
        spec=spec,
        batch_size=int(section.batch_size),
        optimizer=optimizer,
        loss_fn=loss_fn,
        init_params=init_params,
        abstract_params=run.abstract_params(spec),
        teacher=teacher,
        # An exact teacher (the Gaussian mixture) keeps its float32 parameters.
        frozen_dtype=str(run.config.train.frozen_dtype) if networked else "float32",
        microbatches=int(run.config.train.microbatches),
    )


def _autoencoder_stage(run: Run, spec: StageSpec, teacher_state: PyTree) -> loop.Stage:
    """A latent run's autoencoder.

    When it finishes it caches the encoded train split and records the latent scale (see
    `training.autoencoder`).
    """
    del teacher_state  # trained from data alone
    model = run.model(spec)
    loss_fn = autoencoder.make_autoencoder_loss(model, run.config.autoencoder)
    key = jax.random.PRNGKey(spec.seed)

    def finish(state) -> dict:
        ema = jax.device_get(state.ema_params)
        unscaled, _ = make_codec(model, ema, 1.0)
        shape, scale = encode_train_split(unscaled, run.config.data, run.directory(spec))
        logging.info(
            "[%s] latent scale %.5f (1 / std of the encoded train split)", spec.name, scale
        )
        return Latents(scale, shape).to_record()

    stage = _stage(run, spec, loss_fn, lambda _: run.init_params(spec, key))
    return dataclasses.replace(stage, finish=finish)


def _teacher_stage(run: Run, spec: StageSpec, teacher_state: PyTree) -> loop.Stage:
    """The teacher: a fresh network trained with label dropout."""
    del teacher_state  # trained from data alone
    loss_fn = teacher.make_teacher_loss(
        run.model(spec), null_condition=run.null_condition, diffusion=run.config.diffusion
    )
    key = jax.random.PRNGKey(spec.seed)
    return _stage(run, spec, loss_fn, lambda _: run.init_params(spec, key))


def _finetune_stage(run: Run, spec: StageSpec, teacher_params: PyTree) -> loop.Stage:
    """The teacher fine-tuned to another parameterisation: its own loss, from its weights.

    The output layer is copied as it is and read in the new parameterisation, so the network
    starts right where the two agree (low noise, for v from eps) and learns the rest.
    """
    loss_fn = teacher.make_teacher_loss(
        run.model(spec), null_condition=run.null_condition, diffusion=run.config.diffusion
    )
    return _stage(run, spec, loss_fn, lambda t: jax.tree.map(jnp.copy, t), teacher_params)


def _stage_one_stage(run: Run, spec: StageSpec, teacher_state: PyTree) -> loop.Stage:
    """Stage one: the teacher's network plus a guidance branch, regressing the guided teacher.

    The student starts from the teacher's weights (and a zero-output guidance branch), its
    output layer converted to the students' parameterisation (`models.student_head`); with an
    exact Gaussian-mixture teacher there are no weights to copy and it starts fresh.
    """
    teacher_spec = run.stage(spec.teacher)
    copy_teacher = teacher_spec.stage_kind.model is not None
    head = student_head.head_conversion(run.config, run.info.shape[-1])

    def init_params(teacher_params: PyTree) -> PyTree:
        fresh = run.init_params(spec, jax.random.PRNGKey(spec.seed))
        if not copy_teacher:
            return fresh
        return denoiser.student_params_from_teacher(teacher_params, fresh, head)

    loss_fn = distill.make_stage_one_loss(
        run.model(spec),
        lambda state: run.denoise_fn(teacher_spec, state),
        null_condition=run.null_condition,
        diffusion=run.config.diffusion,
        guidance=run.config.guidance,
        w_beta=float(run.config.stage1.w_beta),
        loss_weighting=student_head.stage_one_weighting(run.config),
    )
    return _stage(run, spec, loss_fn, init_params, teacher_state)


def _stage_two_stage(run: Run, spec: StageSpec, teacher_params: PyTree) -> loop.Stage:
    """One halving round: the student starts from its teacher's weights, fresh optimiser."""
    loss_fn = distill.make_stage_two_loss(
        run.model(spec),
        stochastic=bool(run.config.stage2.stochastic),
        first_round=spec.first_round,
        diffusion=run.config.diffusion,
        guidance=run.config.guidance,
        w_beta=float(run.config.stage2.w_beta),
    )
    teacher = {"params": teacher_params, "steps": np.int32(spec.steps)}
    return _stage(run, spec, loss_fn, lambda t: jax.tree.map(jnp.copy, t["params"]), teacher)


BUILDERS: dict[str, Callable[[Run, StageSpec, PyTree], loop.Stage]] = {
    "autoencoder": _autoencoder_stage,
    "teacher": _teacher_stage,
    "finetune": _finetune_stage,
    "stage1": _stage_one_stage,
    "stage2": _stage_two_stage,
}


def _mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    return parallel.make_mesh(config.train.mesh_data_axis, fsdp=config.train.mesh_fsdp_axis)


def _link_teacher(run: Run, teacher_dir: epath.Path) -> None:
    """Make workdir/teacher a symbolic link to an external teacher stage directory.

    Then `sample`, `evaluate` and a later `distill` of this workdir find the teacher that its
    students were distilled from. Nothing is done when the workdir has its own teacher; on a
    filesystem without symbolic links (object stores) a warning says what to copy.
    """
    link = run.directory(run.stage("teacher"))
    if os.path.lexists(str(link)) or jax.process_index() != 0:
        return
    target = teacher_dir.absolute()
    try:
        os.symlink(str(target), str(link), target_is_directory=True)
    except (OSError, NotImplementedError):
        logging.warning(
            "%s could not link to the external teacher %s; copy that directory there for "
            "`sample --model=teacher` and `evaluate`.",
            link,
            target,
        )
        return
    logging.info("[distill] %s links to the external teacher %s.", link, target)


def load_teacher(run: Run, spec: StageSpec, mesh, directory: epath.PathLike | None) -> PyTree:
    """The finished teacher of `spec`, restored straight into its FSDP shardings."""
    teacher_spec = run.stage(spec.teacher)
    if teacher_spec.stage_kind.model is None:
        return run.load_params(teacher_spec)
    shardings = parallel.param_shardings(run.abstract_params(teacher_spec), mesh)
    return run.load_params(teacher_spec, directory=directory, shardings=shardings)


def train_stage(
    run: Run,
    spec: StageSpec,
    mesh: jax.sharding.Mesh,
    *,
    teacher_dir: epath.PathLike | None = None,
    teacher_state: PyTree = None,
    stop_after: int | None = None,
):
    """Train (or resume, or skip when finished) one stage; its teacher must be finished.

    `teacher_state` is the teacher already loaded (by `load_teacher`); else it is loaded here.
    """
    if run.finished(spec) is not None:
        logging.info("[%s] finished earlier; skipped.", spec.name)
        return None
    if spec.teacher and teacher_state is None:
        teacher_state = load_teacher(run, spec, mesh, teacher_dir)
    stage = BUILDERS[spec.kind](run, spec, teacher_state)
    return loop.run_stage(stage, run, mesh, stop_after=stop_after)


def train_teacher(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    *,
    allow_config_change: bool = False,
    stop_after: int | None = None,
):
    """Train (or resume, or skip when finished) the teacher of `workdir`.

    Returns the final TrainState, or None when there was nothing to train.
    """
    run = Run.create(config, workdir, allow_config_change=allow_config_change)
    spec = run.stage("teacher")
    with run.locked():
        if run.latent:  # the teacher learns on the autoencoder's latents
            state = train_stage(run, run.stage("autoencoder"), _mesh(config), stop_after=stop_after)
            if run.finished(run.stage("autoencoder")) is None:  # stopped early (tests)
                run.record_config()
                return state
        if spec.kind not in BUILDERS:
            logging.info("[teacher] the %s teacher needs no training.", spec.kind)
            state = None
        else:
            state = train_stage(run, spec, _mesh(config), stop_after=stop_after)
        run.record_config()
    return state


def distill_stages(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    *,
    only: str | None = None,
    teacher_dir: epath.PathLike | None = None,
    allow_config_change: bool = False,
    stop_after_round: int | None = None,
) -> list[str]:
    """Run stage one, then every stage-two round; finished stages and rounds are skipped.

    Stage one comes after the teacher's fine-tune where the config asks for one (`finetune`).

    Every input (config, recorded config, teacher) is checked before anything is written, so a
    refused run leaves the workdir exactly as it was.

    Args:
      only: None for both stages, 'stage1' or 'stage2' for one of them (stage 2 needs a
        finished stage 1 in the workdir).
      teacher_dir: a finished teacher stage directory; default workdir/teacher.
      stop_after_round: stop after this many stage-two rounds have run in this call (tests).

    Returns:
      The names of the stages this call trained (or resumed) to the end.
    """
    if only not in (None, "stage1", "stage2"):
        raise ValueError(f"only={only!r} is invalid: accepted 'stage1' or 'stage2'.")
    run = Run.create(config, workdir, allow_config_change=allow_config_change)
    if only == "stage2" and run.finished(run.stage("stage1")) is None:
        raise FileNotFoundError(
            f"Stage two needs a finished stage one in {run.directory(run.stage('stage1'))}; "
            "run --only=stage1."
        )
    if run.latent:
        run.latents()  # a missing or unfinished autoencoder is refused before any write
    mesh = _mesh(config)
    wanted = {"finetune", "stage1", "stage2"} if only is None else {only}
    if only == "stage1":
        wanted.add("finetune")  # stage one's teacher, where the config fine-tunes one
    # The first stage to train after the teacher: the fine-tune, where there is one, else stage one.
    first = next(spec for spec in run.stages if spec.kind in ("finetune", "stage1"))
    preloaded = {}
    if "stage1" in wanted and run.finished(first) is None:
        # Checked (and loaded) before the lock creates anything in the workdir.
        preloaded[first.name] = load_teacher(run, first, mesh, teacher_dir)
    trained = []
    with run.locked():
        if teacher_dir is not None:
            _link_teacher(run, epath.Path(teacher_dir))
        for spec in run.stages:
            if spec.kind not in wanted or run.finished(spec) is not None:
                continue
            rounds = sum(1 for name in trained if name.startswith("stage2/"))
            if spec.kind == "stage2" and stop_after_round is not None:
                if rounds >= stop_after_round:
                    break
            train_stage(run, spec, mesh, teacher_state=preloaded.pop(spec.name, None))
            trained.append(spec.name)
        run.record_config()
    return trained
