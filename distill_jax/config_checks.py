"""Validation of a run's config: every value a run depends on, checked before anything is written.

`validate_config` fails with one message naming the first bad key, its value and what is
accepted; `round_schedule` turns config.stage2 into the halving rounds (and refuses an
n_start that is not n_end * 2**k). The schema and its defaults are in config.py.
"""

from __future__ import annotations

import math

import ml_collections

from distill_jax.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from distill_jax.diffusion import guidance_schedule
from distill_jax.diffusion.parameterisation import PARAMETERISATIONS
from distill_jax.diffusion.weighting import WEIGHTINGS
from distill_jax.models.denoiser import DTYPES
from distill_jax.models.embeddings import GUIDANCE_HEADS
from distill_jax.models.kinds import MODEL_KINDS
from distill_jax.models.remat import POLICIES as REMAT_POLICIES
from distill_jax.models.student_head import FINETUNE_TARGETS, STUDENT_PARAMETERISATIONS

TEACHER_KINDS = ("trained", "exact_gmm")
DECAYS = ("cosine", "linear", "constant")
AUTOENCODER_LOSSES = ("l1", "l2")
# Datasets whose examples carry text conditions, and the prompt length they were encoded with.
# Captioned datasets and the token length of their stored text conditions (0: none stored, the
# captions are encoded by an imported pipeline's text encoder: config.text.pipeline).
TEXT_DATASETS = {"digits_text": 16, "image_captions": 0}
FROZEN_DTYPES = ("float32", "bfloat16")  # the frozen teacher's (training.loop.frozen)
LATENT_MODELS = tuple(k for k, kind in MODEL_KINDS.items() if kind.images)  # latents [h, w, c]
TEXT_MODELS = tuple(k for k, kind in MODEL_KINDS.items() if kind.text)


def _fail(key: str, value, accepted: str) -> None:
    raise ValueError(f"config.{key}={value!r} is invalid: accepted {accepted}.")


def _check_number(
    config, key: str, *, low=None, high=None, integer=False, low_open=False, high_open=True
) -> None:
    """Fail unless config[key] is a finite (integer) number within the bounds given."""
    node = config
    for part in key.split("."):
        node = node[part]
    value = node
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "" if low is None else f" {'>' if low_open else '>='} {low}"
        right = "" if high is None else f" {'<' if high_open else '<='} {high}"
        joined = " and".join(part for part in (left, right) if part)
        _fail(key, value, f"{kind}{joined}")


def _check_choices(config: ml_collections.ConfigDict) -> None:
    """The named choices: model kind, parameterisation, dtype, weighting, teacher kind."""
    m = config.model
    if m.kind not in MODEL_KINDS:
        _fail("model.kind", m.kind, f"one of {tuple(MODEL_KINDS)}")
    if m.attention not in ATTENTION_IMPLEMENTATIONS:
        _fail("model.attention", m.attention, f"one of {ATTENTION_IMPLEMENTATIONS}")
    if m.remat not in REMAT_POLICIES:
        _fail("model.remat", m.remat, f"one of {tuple(REMAT_POLICIES)}")
    if config.train.frozen_dtype not in FROZEN_DTYPES:
        _fail("train.frozen_dtype", config.train.frozen_dtype, f"one of {FROZEN_DTYPES}")
    if m.parameterisation not in PARAMETERISATIONS:
        _fail("model.parameterisation", m.parameterisation, f"one of {PARAMETERISATIONS}")
    if config.finetune.to not in FINETUNE_TARGETS:
        _fail("finetune.to", config.finetune.to, f"one of {FINETUNE_TARGETS}")
    if m.student_parameterisation not in STUDENT_PARAMETERISATIONS:
        _fail(
            "model.student_parameterisation",
            m.student_parameterisation,
            f"one of {STUDENT_PARAMETERISATIONS}",
        )
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"one of {tuple(DTYPES)}")
    if m.guidance_head not in GUIDANCE_HEADS:
        _fail("model.guidance_head", m.guidance_head, f"one of {GUIDANCE_HEADS}")
    if config.stage1.loss_weighting not in ("auto", *WEIGHTINGS):
        _fail(
            "stage1.loss_weighting", config.stage1.loss_weighting, f"'auto' or one of {WEIGHTINGS}"
        )
    if config.diffusion.loss_weighting not in WEIGHTINGS:
        _fail("diffusion.loss_weighting", config.diffusion.loss_weighting, f"one of {WEIGHTINGS}")
    if config.teacher.kind not in TEACHER_KINDS:
        _fail("teacher.kind", config.teacher.kind, f"one of {TEACHER_KINDS}")
    if config.teacher.kind == "exact_gmm" and config.data.name != "gmm":
        _fail("teacher.kind", "exact_gmm", "'exact_gmm' only with data.name='gmm'")


def _check_stage_sections(config: ml_collections.ConfigDict) -> None:
    """Counts and optimiser settings of the teacher, stage one and stage two."""
    _check_number(config, "train.microbatches", low=1, integer=True)
    microbatches = int(config.train.microbatches)
    for stage in ("autoencoder", "teacher", "finetune", "stage1", "stage2"):
        _check_number(config, f"{stage}.batch_size", low=1, integer=True)
        if config[stage].batch_size % microbatches:
            _fail(
                f"{stage}.batch_size",
                config[stage].batch_size,
                f"a multiple of train.microbatches={microbatches}",
            )
        opt = f"{stage}.optimizer"
        _check_number(config, f"{opt}.learning_rate", low=0, low_open=True)
        _check_number(config, f"{opt}.warmup_steps", low=0, integer=True)
        _check_number(config, f"{opt}.end_learning_rate_factor", low=0)
        _check_number(config, f"{opt}.weight_decay", low=0)
        _check_number(config, f"{opt}.grad_clip", low=0)
        _check_number(config, f"{opt}.ema_decay", low=0, high=1)
        _check_number(config, f"{opt}.b1", low=0, high=1)
        _check_number(config, f"{opt}.b2", low=0, high=1)
        _check_number(config, f"{opt}.eps", low=0, low_open=True)
        decay = config[stage].optimizer.decay
        if decay not in DECAYS:
            _fail(f"{opt}.decay", decay, f"one of {DECAYS}")
        if "dropout" in config[stage]:
            _check_number(config, f"{stage}.dropout", low=0, high=1)
    _check_number(config, "teacher.num_steps", low=1, integer=True)
    _check_number(config, "stage1.num_steps", low=1, integer=True)
    _check_number(config, "finetune.num_steps", low=1, integer=True)
    _check_number(config, "stage2.steps_per_round", low=1, integer=True)
    _check_number(config, "stage2.final_steps_per_round", low=1, integer=True)
    _check_number(config, "stage2.final_rounds", low=0, integer=True)
    _check_number(config, "stage2.final_learning_rate", low=0)
    round_schedule(config.stage2)


def _check_run_sections(config: ml_collections.ConfigDict) -> None:
    """Model sizes, diffusion, guidance, training-loop and evaluation settings."""
    for key in (
        "model.channels",
        "model.num_res_blocks",
        "model.num_heads",
        "model.mlp_hidden",
        "model.mlp_depth",
        "model.guidance_fourier_dim",
    ):
        _check_number(config, key, low=1, integer=True)
    _check_number(config, "model.emb_dim", low=0, integer=True)
    _check_number(config, "model.student_extra_blocks", low=0, integer=True)
    kind = MODEL_KINDS.get(config.model.kind)
    if kind and not kind.extra_blocks and config.model.student_extra_blocks:
        grows = tuple(k for k, kind in MODEL_KINDS.items() if kind.extra_blocks)
        _fail(
            "model.student_extra_blocks",
            config.model.student_extra_blocks,
            f"0 with model.kind={config.model.kind!r} (only {grows} grow extra blocks)",
        )
    _check_number(config, "eval.classifier.image_size", low=0, integer=True)
    _check_number(config, "model.dropout", low=0, high=1)
    _check_number(config, "diffusion.logsnr_max", low=-100, high=100)
    _check_number(config, "diffusion.logsnr_min", low=-100, high=config.diffusion.logsnr_max)
    _check_number(config, "diffusion.p_uncond", low=0, high=1)
    _check_number(config, "guidance.w_max")
    _check_number(config, "guidance.w_min", low=-1)  # w = -1 is the unconditional model
    _check_number(config, "stage1.w_beta", low=0, low_open=True)
    _check_number(config, "stage2.w_beta", low=0, low_open=True)
    if not config.guidance.w_min <= config.guidance.w_max:
        _fail("guidance", (config.guidance.w_min, config.guidance.w_max), "w_min <= w_max")
    for key in (
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.mesh_fsdp_axis",
        "eval.num_samples",
        "eval.seeds",
        "eval.batch_size",
        "eval.grid_rows",
    ):
        _check_number(config, key, low=1, integer=True)
    if config.train.mesh_data_axis != -1:
        _check_number(config, "train.mesh_data_axis", low=1, integer=True)
    for w in config.eval.guidance_weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            _fail("eval.guidance_weights", tuple(config.eval.guidance_weights), "finite numbers")
    schedules = config.eval.guidance_schedules
    if isinstance(schedules, str) or not isinstance(schedules, tuple | list):
        _fail("eval.guidance_schedules", schedules, "a tuple of names, e.g. ('interval:0.2,0.8',)")
    for name in schedules:
        try:
            guidance_schedule.parse_schedule(name)
        except ValueError as error:
            raise ValueError(f"config.eval.guidance_schedules: {error}") from None


def _check_autoencoder(config: ml_collections.ConfigDict) -> None:
    """The autoencoder section of a latent run (config.autoencoder.enabled)."""
    ae = config.autoencoder
    if not isinstance(ae.enabled, bool):
        _fail("autoencoder.enabled", ae.enabled, "True or False")
    if not ae.enabled:
        return
    if config.data.name == "gmm" or config.model.kind not in LATENT_MODELS:
        _fail(
            "autoencoder.enabled",
            True,
            f"True only for image data with model.kind in {LATENT_MODELS} (latents are "
            "images [h, w, c])",
        )
    if not isinstance(ae.pipeline, str):
        _fail("autoencoder.pipeline", ae.pipeline, "'' or a diffusers pipeline folder with vae/")
    for key in ("channels", "num_res_blocks", "latent_channels", "batch_size", "num_steps"):
        _check_number(config, f"autoencoder.{key}", low=1, integer=True)
    mult = tuple(ae.channel_mult)
    if not mult or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mult):
        _fail("autoencoder.channel_mult", mult, "a non-empty tuple of integers >= 1")
    _check_number(config, "autoencoder.kl_weight", low=0)
    _check_number(config, "autoencoder.dropout", low=0, high=1)
    if ae.loss not in AUTOENCODER_LOSSES:
        _fail("autoencoder.loss", ae.loss, f"one of {AUTOENCODER_LOSSES}")


def _check_text(config: ml_collections.ConfigDict) -> None:
    """The text section: a text run needs a captioned dataset and a U-Net, and vice versa."""
    text = config.text
    if not isinstance(text.enabled, bool):
        _fail("text.enabled", text.enabled, "True or False")
    if config.data.name in TEXT_DATASETS and not text.enabled:
        _fail("text.enabled", False, f"True for the captioned dataset {config.data.name!r}")
    if not text.enabled:
        return
    if config.data.name not in TEXT_DATASETS:
        _fail("text.enabled", True, f"True only with config.data.name in {tuple(TEXT_DATASETS)}")
    if config.model.kind not in TEXT_MODELS:
        _fail("model.kind", config.model.kind, f"one of {TEXT_MODELS} for a text-conditioned run")
    if not isinstance(text.pipeline, str):
        _fail("text.pipeline", text.pipeline, "'' or a diffusers pipeline folder")
    _check_number(config, "text.clip_skip", low=0, integer=True)
    _check_number(config, "text.max_sequence_length", low=1, integer=True)
    if text.clip_skip and not text.pipeline:
        _fail("text.clip_skip", text.clip_skip, "0 without a CLIP pipeline (text.pipeline)")
    if text.pipeline:  # captions are encoded again by the pipeline, at its length
        return
    tokens = TEXT_DATASETS[config.data.name]
    if not tokens:
        _fail(
            "text.pipeline",
            text.pipeline,
            f"a text-to-image pipeline for data.name={config.data.name!r}, whose captions have "
            "no stored encoding: import one with --teacher=diffusers:DIR",
        )
    if config.text.max_tokens != tokens:
        _fail(
            "text.max_tokens",
            config.text.max_tokens,
            f"{tokens}, the length {config.data.name!r} was encoded with",
        )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check every value a run depends on before anything is written.

    Raises:
      ValueError: naming the first bad key, its value and what is accepted.
    """
    _check_choices(config)
    _check_autoencoder(config)
    _check_text(config)
    _check_stage_sections(config)
    _check_run_sections(config)


def round_schedule(stage2: ml_collections.ConfigDict) -> list[tuple[int, int, bool]]:
    """[(student steps N, training steps, final)] of every round, from n_start/2 to n_end.

    The last `final_rounds` rounds (final=True) train `final_steps_per_round` steps (the paper
    trains the last, hardest rounds longer), the others `steps_per_round`; with
    `final_learning_rate` > 0 the final ones also train at that peak learning rate.

    Raises:
      ValueError: n_start is not n_end * 2**k with n_end >= 1.
    """
    n_start, n_end = int(stage2.n_start), int(stage2.n_end)
    ratio = n_start // n_end if n_end >= 1 and n_start % n_end == 0 else 0
    if ratio < 1 or ratio & (ratio - 1):
        _fail(
            "stage2.n_start", (n_start, n_end), "n_start = n_end * 2**k with n_end >= 1 and k >= 0"
        )
    steps, n = [], n_start
    while n > n_end:
        n //= 2
        steps.append(n)
    first_final = len(steps) - int(stage2.final_rounds)
    return [
        (
            n,
            int(stage2.final_steps_per_round if k >= first_final else stage2.steps_per_round),
            k >= first_final,
        )
        for k, n in enumerate(steps)
    ]
