"""A diffusers scheduler/ folder: the discrete DDPM-family schedule in this library's terms.

`read_schedule(folder)` gives the config.model keys (the discrete schedule of log-SNRs and the
network's parameterisation) and the record of what was read (the sampling settings diffusers'
DDIM uses, the trained log-SNR range). Flow-matching and zero-terminal-SNR schedules are refused.
"""

from __future__ import annotations

import os

from distill_jax.diffusion import discrete
from distill_jax.interop.core import FolderError, integer, number, read_json, require

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


def schedule_config(cfg: dict, where: str = "scheduler/scheduler_config.json") -> tuple[dict, str]:
    """(config.model.discrete_schedule keys, parameterisation) of a diffusers scheduler config.

    Raises:
      FolderError: a scheduler, beta schedule or prediction type that is not supported.
    """
    require(cfg, "_class_name", SCHEDULERS, where)
    if cfg.get("trained_betas") is not None:
        raise FolderError(f"{where} has trained_betas: accepted null (a named beta_schedule)")
    if cfg.get("rescale_betas_zero_snr"):
        raise FolderError(
            f"{where} has rescale_betas_zero_snr=true: accepted false (a zero terminal SNR has "
            "no finite log-SNR)"
        )
    require(cfg, "beta_schedule", discrete.BETA_SCHEDULES, where)
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in discrete.PREDICTION_TYPES:
        raise FolderError(
            f"{where} has prediction_type={prediction!r}: accepted "
            f"{', '.join(map(repr, discrete.PREDICTION_TYPES))}"
        )
    schedule = dict(
        beta_schedule=cfg["beta_schedule"],
        beta_start=number(cfg, "beta_start", where, 0.0001, positive=True),
        beta_end=number(cfg, "beta_end", where, 0.02, positive=True),
        num_train_timesteps=integer(cfg, "num_train_timesteps", where, 1000, low=2),
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
    where = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler = read_json(where, "the scheduler config")
    schedule, parameterisation = schedule_config(scheduler, where)
    if "timestep_spacing" in scheduler:
        require(scheduler, "timestep_spacing", discrete.TIMESTEP_SPACINGS, where)
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
            steps_offset=integer(scheduler, "steps_offset", where, 0, low=0),
            set_alpha_to_one=bool(scheduler.get("set_alpha_to_one", True)),
            clip_sample=bool(scheduler.get("clip_sample", False)),
        ),
        logsnr_range=list(discrete.trained_logsnr_range(table)),
    )
    return dict(discrete_schedule=schedule, parameterisation=parameterisation), record
