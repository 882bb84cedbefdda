"""A diffusers scheduler/ folder: its schedule in this library's terms.

`read_schedule(folder)` gives the config.model keys and the record of what was read:
- a discrete DDPM-family scheduler: the discrete schedule of log-SNRs and the network's
  parameterisation; recorded, the sampling settings diffusers' DDIM uses and the trained
  log-SNR range [lambda_{K-1}, lambda_0]. Zero-terminal-SNR schedules are refused;
- FlowMatchEulerDiscreteScheduler (SD3, SD3.5, FLUX): the flow's time input
  (flow_schedule.num_train_timesteps) and the 'flow' parameterisation (velocity eps - x,
  `diffusion.flow`); recorded, the shift (static, or use_dynamic_shifting's base_shift,
  max_shift, token counts and time_shift_type) its sampler uses, and the trained range: from
  the noise end (s = 1; FLOW_LOGSNR_MIN stands for its -infinity) to the least noisy training
  sigma. Settings that change which noise levels the sampler visits beyond the shift (Karras,
  exponential or beta sigmas, shift_terminal, invert_sigmas, stochastic_sampling) are refused.
"""

from __future__ import annotations

import math
import os

from distill_jax.diffusion import discrete, flow
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
    require(cfg, "_class_name", (*SCHEDULERS, FLOW_SCHEDULER), where)  # flow: read_schedule
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


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# The noise end of a flow's trained range (s = 1, lambda = -infinity) as a finite log-SNR: that
# of the largest float32 s below 1 (1 - 2^-24). A run clips it to its own logsnr_min.
FLOW_LOGSNR_MIN = 2.0 * math.log(2.0**-24)
# FlowMatchEulerDiscreteScheduler settings this reader does not reproduce: each must be false.
_FLOW_REFUSED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
    "shift_terminal",
)


def flow_schedule_config(cfg: dict, where: str) -> dict:
    """The record's schedule of a FlowMatchEulerDiscreteScheduler config (kind 'flow').

    Raises:
      FolderError: a setting this reader does not reproduce, or a value of the wrong type.
    """
    for key in _FLOW_REFUSED:
        if cfg.get(key):
            raise FolderError(
                f"{where} has {key}={cfg[key]!r}: accepted false or null (distill_jax "
                "reproduces the shifted linear sigmas of SD3, SD3.5 and FLUX only)"
            )
    schedule = dict(
        kind="flow",
        num_train_timesteps=integer(cfg, "num_train_timesteps", where, 1000, low=2),
        shift=number(cfg, "shift", where, 1.0, positive=True),
        use_dynamic_shifting=bool(cfg.get("use_dynamic_shifting", False)),
    )
    if "time_shift_type" in cfg:  # diffusers refuses another even where it is unused
        require(cfg, "time_shift_type", flow.TIME_SHIFT_TYPES, where)
    if schedule["use_dynamic_shifting"]:
        schedule.update(
            base_shift=number(cfg, "base_shift", where, 0.5),
            max_shift=number(cfg, "max_shift", where, 1.15),
            base_image_seq_len=integer(cfg, "base_image_seq_len", where, 256),
            max_image_seq_len=integer(cfg, "max_image_seq_len", where, 4096),
            time_shift_type=cfg.get("time_shift_type", "exponential"),
        )
        if schedule["max_image_seq_len"] == schedule["base_image_seq_len"]:
            raise FolderError(
                f"{where} has max_image_seq_len equal to base_image_seq_len: accepted two "
                "different token counts (the shift is linear between them)"
            )
    return schedule


def _read_flow_schedule(scheduler: dict, where: str) -> tuple[dict, dict]:
    schedule = flow_schedule_config(scheduler, where)
    k = schedule["num_train_timesteps"]
    # With dynamic shifting diffusers trains on the unshifted sigmas (the shift follows the
    # resolution); the least noisy is then 1 / K.
    shift = 1.0 if schedule["use_dynamic_shifting"] else schedule["shift"]
    record = dict(
        scheduler_class=scheduler["_class_name"],
        schedule=schedule,
        logsnr_range=[FLOW_LOGSNR_MIN, flow.trained_logsnr_max(k, shift)],
    )
    keys = dict(flow_schedule=dict(num_train_timesteps=k), parameterisation="flow")
    return keys, record


def read_schedule(folder: str) -> tuple[dict, dict]:
    """(config.model keys, record entries) of a pipeline folder's scheduler/.

    The keys are the time input's schedule and the parameterisation; the record holds the
    scheduler's class, the schedule with the sampling settings diffusers' sampler reads
    (discrete: prediction type, timestep spacing, steps offset, set_alpha_to_one, clip_sample;
    flow: the shift) and the trained log-SNR range (see the module docstring).

    Raises:
      FolderError: a missing or unsupported scheduler config.
    """
    where = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler = read_json(where, "the scheduler config")
    if scheduler.get("_class_name") == FLOW_SCHEDULER:
        return _read_flow_schedule(scheduler, where)
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
