"""Pure diffusion math: schedule, parameterisations, guidance, samplers, losses, targets.

No Flax and no I/O: every function takes arrays and a `denoise_fn(z, t, conditions, w) -> xhat`.
"""

from distill_jax.diffusion.gmm import (
    GaussianMixture,
    gmm_xhat,
    make_gmm,
    make_gmm_denoise_fn,
)
from distill_jax.diffusion.guidance import (
    CondFn,
    DenoiseFn,
    as_partial,
    guided_xhat,
    make_guided_denoise_fn,
)
from distill_jax.diffusion.guidance_schedule import (
    GuidanceSchedule,
    guided_evaluations,
    parse_schedule,
)
from distill_jax.diffusion.parameterisation import (
    PARAMETERISATIONS,
    check_parameterisation,
    eps_from_v,
    eps_from_x,
    output_channels,
    v_from_x_eps,
    x_from_eps,
    x_from_v,
    xhat_from_output,
)
from distill_jax.diffusion.samplers import (
    SAMPLERS,
    ancestral_sample,
    ddim_sample,
    ddim_step,
    noise_to,
    run_sampler,
    stochastic_sample,
)
from distill_jax.diffusion.schedule import (
    LOGSNR_MAX,
    LOGSNR_MIN,
    alpha_sigma,
    alpha_sigma_at,
    expand_to,
    logsnr_schedule_cosine,
    q_sample,
    t_from_logsnr,
    transition,
)
from distill_jax.diffusion.targets import progressive_target, round_times
from distill_jax.diffusion.weighting import (
    WEIGHTINGS,
    check_weighting,
    loss_weight,
    weighted_mse,
)

__all__ = [
    "LOGSNR_MAX",
    "LOGSNR_MIN",
    "PARAMETERISATIONS",
    "SAMPLERS",
    "WEIGHTINGS",
    "CondFn",
    "DenoiseFn",
    "GaussianMixture",
    "GuidanceSchedule",
    "alpha_sigma",
    "alpha_sigma_at",
    "ancestral_sample",
    "as_partial",
    "check_parameterisation",
    "check_weighting",
    "ddim_sample",
    "ddim_step",
    "eps_from_v",
    "eps_from_x",
    "expand_to",
    "gmm_xhat",
    "guided_evaluations",
    "guided_xhat",
    "logsnr_schedule_cosine",
    "loss_weight",
    "make_gmm",
    "make_gmm_denoise_fn",
    "make_guided_denoise_fn",
    "noise_to",
    "parse_schedule",
    "run_sampler",
    "output_channels",
    "progressive_target",
    "q_sample",
    "stochastic_sample",
    "round_times",
    "t_from_logsnr",
    "transition",
    "v_from_x_eps",
    "weighted_mse",
    "x_from_eps",
    "x_from_v",
    "xhat_from_output",
]
