"""Flax (linen) networks: U-Net and MLP with log-SNR, class and guidance-weight embeddings.

`build_model` turns `config.model` into a module, `init_params` initialises it,
`make_denoise_fn` wraps module and params into the denoise_fn(z, t, conditions, w) -> xhat that the
diffusion code takes, and `student_params_from_teacher` starts a distilled student from its
teacher.
"""

from distill_jax.models.denoiser import (
    build_model,
    count_params,
    init_params,
    make_denoise_fn,
    student_params_from_teacher,
)
from distill_jax.models.embeddings import (
    GUIDANCE_BRANCH,
    GUIDANCE_HEAD,
    ConditioningEmbedding,
    GuidanceEmbedding,
    guidance_fourier_features,
    logsnr_to_unit_interval,
    sinusoidal_embedding,
)
from distill_jax.models.mlp import MLPDenoiser
from distill_jax.models.unet import UNet

__all__ = [
    "GUIDANCE_BRANCH",
    "GUIDANCE_HEAD",
    "ConditioningEmbedding",
    "GuidanceEmbedding",
    "MLPDenoiser",
    "UNet",
    "build_model",
    "count_params",
    "guidance_fourier_features",
    "init_params",
    "logsnr_to_unit_interval",
    "make_denoise_fn",
    "sinusoidal_embedding",
    "student_params_from_teacher",
]
