"""Workdir handling and the stage builders that the command line and notebooks call.

Workdir layout of one run: config.json, teacher/, stage1/, stage2/steps_XXXX/, eval/,
report.md, metrics.jsonl, logs/. `prepare_workdir` validates the config and records it; resuming
a workdir whose recorded config differs in a key that changes the model or the data is refused
unless the caller allows it, and the old record is then kept as config.previous.json.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distill_jax import checkpoints, parallel
from distill_jax import config as config_lib
from distill_jax.data import sources
from distill_jax.models import denoiser
from distill_jax.training import distill, loop, teacher

PyTree = Any

# Keys whose change makes existing checkpoints meaningless (another network or another data).
MODEL_DEFINING_PREFIXES = (
    "model.",
    "teacher.kind",
    "data.name",
    "data.image_size",
    "data.gmm.",
    "diffusion.logsnr_min",
    "diffusion.logsnr_max",
)


class ConfigMismatchError(ValueError):
    """The workdir was made with a config that builds a different model or dataset."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, tuple):
        tree = list(tree)
    return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Model-defining keys whose values differ: {key: (old, new)}."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    diffs = {}
    for key in sorted(set(flat_old) | set(flat_new)):
        if not key.startswith(MODEL_DEFINING_PREFIXES):
            continue
        if flat_old.get(key) != flat_new.get(key):
            diffs[key] = (flat_old.get(key), flat_new.get(key))
    return diffs


def check_workdir_config(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    allow_config_change: bool = False,
) -> pathlib.Path:
    """Validate `config` against itself and workdir/config.json; writes nothing.

    Returns the absolute workdir. Raises ValueError (ConfigMismatchError for a recorded config
    that builds another model or dataset, unless `allow_config_change`).
    """
    config_lib.validate_config(config)
    workdir = pathlib.Path(workdir).absolute()
    path = workdir / "config.json"
    if path.exists():
        diffs = config_differences(json.loads(path.read_text()), json.loads(config.to_json()))
        if diffs and not allow_config_change:
            shown = "; ".join(
                f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items())
            )
            raise ConfigMismatchError(
                f"{workdir} was created with a different model/data config ({shown}). Use a new "
                "--workdir, or pass --allow_config_change to resume anyway."
            )
    return workdir


def prepare_workdir(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    allow_config_change: bool = False,
) -> pathlib.Path:
    """Validate `config`, create `workdir` and record the config in workdir/config.json."""
    workdir = check_workdir_config(config, workdir, allow_config_change=allow_config_change)
    new = json.loads(config.to_json())
    path = workdir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != new and jax.process_index() == 0:
            (workdir / "config.previous.json").write_text(json.dumps(old, indent=2))
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "config.json.tmp"
        tmp.write_text(json.dumps(new, indent=2))
        tmp.replace(path)
    return workdir


def dataset_info(config: ml_collections.ConfigDict) -> sources.DatasetInfo:
    """Shape and class count of the configured dataset (from its TFDS info)."""
    _, info = sources.load_source(config.data, split=config.data.train_split, seed=config.seed)
    return info


def build_denoiser_model(
    config: ml_collections.ConfigDict, info: sources.DatasetInfo, *, use_guidance: bool
):
    """The configured network for this dataset, with or without the guidance branch."""
    return denoiser.build_model(
        config.model,
        data_shape=tuple(info.shape),
        num_classes=info.num_classes,
        use_guidance=use_guidance,
        logsnr_min=config.diffusion.logsnr_min,
        logsnr_max=config.diffusion.logsnr_max,
    )


def teacher_stage(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, info: sources.DatasetInfo
) -> loop.Stage:
    """The teacher-training stage: a fresh network trained with label dropout."""
    model = build_denoiser_model(config, info, use_guidance=False)
    init_rng = jax.random.PRNGKey(config.seed)

    def init_params():
        return denoiser.init_params(model, init_rng, data_shape=tuple(info.shape))

    return loop.Stage(
        name="teacher",
        directory=workdir / "teacher",
        num_steps=config.teacher.num_steps,
        batch_size=config.teacher.batch_size,
        optimizer=config.teacher.optimizer,
        loss_fn=teacher.make_teacher_loss(
            model, num_classes=info.num_classes, diffusion=config.diffusion
        ),
        init_params=init_params,
        abstract_params=jax.eval_shape(init_params),
        seed=config.seed,
    )


def train_teacher(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    allow_config_change: bool = False,
    stop_after: int | None = None,
):
    """Train (or resume, or skip when finished) the teacher of `workdir`."""
    workdir = prepare_workdir(config, workdir, allow_config_change=allow_config_change)
    if config.teacher.kind == "exact_gmm":
        print("[teacher] the exact Gaussian-mixture denoiser needs no training.", flush=True)
        return None
    mesh = parallel.make_mesh(config.train.mesh_data_axis, fsdp=config.train.mesh_fsdp_axis)
    info = dataset_info(config)
    stage = teacher_stage(config, workdir, info)
    return loop.run_stage(stage, config=config, workdir=workdir, mesh=mesh, stop_after=stop_after)


def _check_compatible(params: PyTree, abstract: PyTree, source: pathlib.Path) -> None:
    """Fail unless `params` has the structure and leaf shapes `abstract` expects."""
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    want = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
    for path in sorted(set(got) | set(want), key=str):
        name = jax.tree_util.keystr(path)
        if path not in got or path not in want:
            side = (
                "missing from the checkpoint" if path not in got else "not in this config's model"
            )
            raise ValueError(
                f"Incompatible teacher checkpoint {source}: parameter {name} is {side}. The "
                "teacher must have been trained with this config's model and data settings."
            )
        if tuple(got[path].shape) != tuple(want[path].shape):
            raise ValueError(
                f"Incompatible teacher checkpoint {source}: parameter {name} has shape "
                f"{tuple(got[path].shape)}, this config's model expects {tuple(want[path].shape)}."
            )


def load_teacher_params(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    info: sources.DatasetInfo,
    *,
    teacher_dir: str | pathlib.Path | None = None,
) -> PyTree:
    """The finished teacher's EMA params, from workdir/teacher or `teacher_dir`, checked."""
    source = pathlib.Path(teacher_dir).absolute() if teacher_dir else workdir / "teacher"
    if not source.exists():
        raise FileNotFoundError(
            f"No teacher checkpoint at {source}: train one with `distill-jax train` or pass "
            "--teacher=PATH to a teacher stage directory."
        )
    if checkpoints.stage_finished(source) is None:
        raise FileNotFoundError(
            f"The teacher at {source} has not finished training (no {checkpoints.FINISHED_FILE}); "
            "finish it with `distill-jax train` first."
        )
    params = checkpoints.restore_stage_params(source, which="ema_params")
    model = build_denoiser_model(config, info, use_guidance=False)
    abstract = jax.eval_shape(
        lambda: denoiser.init_params(model, jax.random.PRNGKey(0), data_shape=tuple(info.shape))
    )
    _check_compatible(params, abstract, source)
    return params


def student_model(
    config: ml_collections.ConfigDict, info: sources.DatasetInfo, dropout: float = 0.0
) -> nn.Module:
    """The distilled student: the teacher's network plus the guidance-weight branch."""
    student_config = ml_collections.ConfigDict(config.model.to_dict())
    student_config.dropout = dropout
    return denoiser.build_model(
        student_config,
        data_shape=tuple(info.shape),
        num_classes=info.num_classes,
        use_guidance=True,
        logsnr_min=config.diffusion.logsnr_min,
        logsnr_max=config.diffusion.logsnr_max,
    )


def stage_one_stage(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    info: sources.DatasetInfo,
    teacher_state: PyTree,
) -> loop.Stage:
    """Stage one: the teacher's network plus a guidance branch, regressing the guided teacher.

    With config.teacher.kind == 'exact_gmm', `teacher_state` is the GaussianMixture and the
    student starts from a fresh initialisation (there are no teacher weights to copy).
    """
    student = student_model(config, info, config.stage1.dropout)
    init_rng = jax.random.PRNGKey(config.seed + 1)
    exact = config.teacher.kind == "exact_gmm"
    if exact:
        teacher_xhat = distill.exact_gmm_teacher(config.diffusion)
    else:
        teacher_model = build_denoiser_model(config, info, use_guidance=False)
        teacher_xhat = distill.network_teacher(teacher_model)

    def fresh_student():
        return denoiser.init_params(student, init_rng, data_shape=tuple(info.shape))

    def init_params():
        if exact:
            return fresh_student()
        return denoiser.student_params_from_teacher(teacher_state, fresh_student())

    return loop.Stage(
        name="stage1",
        directory=workdir / "stage1",
        num_steps=config.stage1.num_steps,
        batch_size=config.stage1.batch_size,
        optimizer=config.stage1.optimizer,
        loss_fn=distill.make_stage_one_loss(
            student,
            teacher_xhat,
            num_classes=info.num_classes,
            diffusion=config.diffusion,
            guidance=config.guidance,
        ),
        init_params=init_params,
        abstract_params=jax.eval_shape(fresh_student),
        frozen=teacher_state,
        seed=config.seed + 1,
    )


def round_directory(workdir: pathlib.Path, steps: int) -> pathlib.Path:
    """The Orbax directory of the stage-two round whose student samples in `steps` steps."""
    return workdir / "stage2" / f"steps_{steps:04d}"


def stage_two_stage(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    info: sources.DatasetInfo,
    teacher_params: PyTree,
    *,
    steps: int,
    num_steps: int,
    first_round: bool,
) -> loop.Stage:
    """One halving round: the student starts from the teacher's weights, fresh optimiser."""
    student = student_model(config, info, config.stage2.dropout)
    return loop.Stage(
        name=f"stage2/steps_{steps:04d}",
        directory=round_directory(workdir, steps),
        num_steps=num_steps,
        batch_size=config.stage2.batch_size,
        optimizer=config.stage2.optimizer,
        loss_fn=distill.make_stage_two_loss(
            student,
            stochastic=bool(config.stage2.stochastic),
            first_round=first_round,
            diffusion=config.diffusion,
            guidance=config.guidance,
        ),
        init_params=lambda: jax.tree.map(jnp.copy, teacher_params),
        abstract_params=jax.eval_shape(lambda: teacher_params),
        frozen={"teacher": teacher_params, "steps": np.int32(steps)},
        seed=config.seed + 2 + steps,
    )


def distill_stages(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    only: str | None = None,
    teacher_dir: str | pathlib.Path | None = None,
    allow_config_change: bool = False,
    stop_after_round: int | None = None,
) -> None:
    """Run stage one, then every stage-two round; finished stages and rounds are skipped.

    Args:
      only: None for both stages, 'stage1' or 'stage2' for one of them (stage 2 needs a
        finished stage 1 in the workdir).
      teacher_dir: a finished teacher stage directory; default workdir/teacher.
      stop_after_round: stop after this many stage-two rounds have run in this call (tests).
    """
    if only not in (None, "stage1", "stage2"):
        raise ValueError(f"only={only!r} is invalid: accepted 'stage1' or 'stage2'.")
    rounds = distill.round_schedule(config.stage2)
    # Every input (config, recorded config, teacher) is checked before anything is written, so
    # a refused run leaves the workdir exactly as it was.
    workdir = check_workdir_config(config, workdir, allow_config_change=allow_config_change)
    info = dataset_info(config)
    if only != "stage2":
        if config.teacher.kind == "exact_gmm":
            teacher_state = sources.gmm_from_config(config.data.gmm)
        else:
            teacher_state = load_teacher_params(config, workdir, info, teacher_dir=teacher_dir)
    elif checkpoints.stage_finished(workdir / "stage1") is None:
        raise FileNotFoundError(
            f"Stage two needs a finished stage one in {workdir / 'stage1'}; run --only=stage1."
        )
    workdir = prepare_workdir(config, workdir, allow_config_change=allow_config_change)
    mesh = parallel.make_mesh(config.train.mesh_data_axis, fsdp=config.train.mesh_fsdp_axis)
    if only != "stage2":
        stage = stage_one_stage(config, workdir, info, teacher_state)
        loop.run_stage(stage, config=config, workdir=workdir, mesh=mesh)
    if only == "stage1":
        return
    if checkpoints.stage_finished(workdir / "stage1") is None:
        raise FileNotFoundError(
            f"Stage two needs a finished stage one in {workdir / 'stage1'}; run --only=stage1."
        )
    current = workdir / "stage1"
    ran = 0
    for index, (steps, num_steps) in enumerate(rounds):
        directory = round_directory(workdir, steps)
        if checkpoints.stage_finished(directory) is None:
            if stop_after_round is not None and ran >= stop_after_round:
                return
            teacher_params = checkpoints.restore_stage_params(current, which="ema_params")
            stage = stage_two_stage(
                config,
                workdir,
                info,
                teacher_params,
                steps=steps,
                num_steps=num_steps,
                first_round=index == 0,
            )
            loop.run_stage(stage, config=config, workdir=workdir, mesh=mesh)
            ran += 1
        current = directory
