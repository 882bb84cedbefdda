"""The registry of stage kinds and the stages a config's run is made of.

A stage kind says what a stage is: which config section holds its batch size, steps and
optimiser, whether its network takes the guidance weight w, and how its network is built. A
config's run is the list of `StageSpec`s `plan_stages` makes: the teacher, its fine-tune to
another parameterisation where the config asks for one, stage one, then one stage-two round per
halving, each naming the stage whose weights it learns from. A new kind of
stage (the autoencoder of a latent run, a text encoder) is one more `StageKind` here plus its
own module; the callers (training, sampling, evaluation, export, CLI) go through `Run` and need
no new branch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import flax.linen as nn
import ml_collections

from distill_jax import config_checks, text_encoder
from distill_jax.data import sources
from distill_jax.interop import core as interop_core
from distill_jax.interop import vae as vae_reader
from distill_jax.models import autoencoder, denoiser, student_head
from distill_jax.models.kinds import MODEL_KINDS

ModelFactory = Callable[[ml_collections.ConfigDict, sources.DatasetInfo, float], nn.Module]


def text_width(config: ml_collections.ConfigDict) -> int:
    """The width D of a text run's conditions [L, D] (0 for a class-label run).

    An imported text-to-image network's (its pipeline's text encoder: an SD U-Net's
    cross_attention_dim, an MMDiT's packed condition), else the bundled MiniLM's.
    """
    if not config.text.enabled:
        return 0
    width = MODEL_KINDS[str(config.model.kind)].text_width
    return text_encoder.WIDTH if width is None else width(config.model)


def _denoiser_factory(use_guidance: bool, finetuned: bool = False) -> ModelFactory:
    """A factory of the teacher's network, or of its fine-tune's or of a student's.

    `finetuned`: in the fine-tune's parameterisation; `use_guidance`: a student's network, with
    the w branch, in the students' parameterisation.
    """

    def build(config: ml_collections.ConfigDict, info: sources.DatasetInfo, dropout: float):
        if use_guidance:
            model_config = student_head.student_model_config(config)
        else:
            model_config = ml_collections.ConfigDict(config.model.to_dict())
        if finetuned:
            model_config.parameterisation = student_head.finetune_target(config)
        model_config.dropout = dropout
        return denoiser.build_model(
            model_config,
            data_shape=tuple(info.shape),
            num_classes=info.num_classes,
            use_guidance=use_guidance,
            text_dim=text_width(config),
            logsnr_min=config.diffusion.logsnr_min,
            logsnr_max=config.diffusion.logsnr_max,
        )

    return build


@functools.lru_cache(maxsize=4)
def _read_vae_config(folder: str) -> dict:
    return interop_core.read_json(os.path.join(folder, "vae", "config.json"), "the VAE config")


def imported_vae_config(config: ml_collections.ConfigDict) -> dict:
    """vae/config.json of the pipeline whose VAE is the run's autoencoder (autoencoder.pipeline).

    Raises:
      FolderError: the file is missing or not JSON.
    """
    return dict(_read_vae_config(os.path.abspath(str(config.autoencoder.pipeline))))


def _autoencoder_factory(
    config: ml_collections.ConfigDict, info: sources.DatasetInfo, dropout: float
) -> nn.Module:
    """The library's own KL autoencoder, or an imported pipeline's AutoencoderKL (`kl_vae`)."""
    del dropout  # the autoencoder has none
    if config.autoencoder.pipeline:
        return vae_reader.vae_model(imported_vae_config(config))
    return autoencoder.build_autoencoder(config.autoencoder, image_shape=info.shape)


@dataclasses.dataclass(frozen=True)
class StageKind:
    """What a kind of stage is.

    Attributes:
      name: the kind's name.
      section: the config section with its batch_size, num_steps, optimizer (and dropout).
      takes_w: whether its network takes the guidance weight (a distilled student).
      model: (config, dataset info, dropout) -> the Flax network; None for a stage without a
        network (the exact Gaussian-mixture denoiser), which also has no checkpoints.
      init: (network, rng, data_shape) -> its initial params (pure in rng).
      on_images: it trains on the images themselves, not on what diffusion runs on (the
        latents of a latent run); its network sees `Run.image_info`, the others `Run.info`.
    """

    name: str
    section: str
    takes_w: bool
    model: ModelFactory | None
    init: Callable = denoiser.init_params
    on_images: bool = False


KINDS: dict[str, StageKind] = {
    kind.name: kind
    for kind in (
        StageKind(
            "autoencoder",
            "autoencoder",
            takes_w=False,
            model=_autoencoder_factory,
            init=autoencoder.init_autoencoder,
            on_images=True,
        ),
        StageKind("teacher", "teacher", takes_w=False, model=_denoiser_factory(False)),
        StageKind("exact_gmm", "teacher", takes_w=False, model=None),
        StageKind("finetune", "finetune", takes_w=False, model=_denoiser_factory(False, True)),
        StageKind("stage1", "stage1", takes_w=True, model=_denoiser_factory(True)),
        StageKind("stage2", "stage2", takes_w=True, model=_denoiser_factory(True)),
    )
}


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a run.

    Attributes:
      name: its name, also its directory relative to the workdir ('stage2/steps_0064').
      kind: a key of KINDS.
      steps: the student's sampling steps N (None for the teacher, sampled at any N).
      num_steps: its training steps.
      teacher: the name of the stage whose weights it learns from (None for the teacher).
      seed: seeds its initialisation, its data order and its training randomness.
      first_round: the first halving round (its teacher is stage one's continuous-time
        student, not a round of the same grid).
      final_round: one of the last `stage2.final_rounds` rounds (their own training steps
        and, where set, learning rate: `config_checks.round_schedule`).
    """

    name: str
    kind: str
    steps: int | None
    num_steps: int
    teacher: str | None
    seed: int
    first_round: bool = False
    final_round: bool = False

    @property
    def stage_kind(self) -> StageKind:
        """Its entry in KINDS."""
        return KINDS[self.kind]


# The teacher fine-tuned to another parameterisation (config.finetune), stage one's teacher.
FINETUNE_STAGE = "teacher_v"


def round_name(steps: int) -> str:
    """The name (and directory) of the halving round whose student samples in `steps` steps."""
    return f"stage2/steps_{steps:04d}"


def plan_stages(config: ml_collections.ConfigDict) -> list[StageSpec]:
    """Every stage of the run `config` describes, in training order."""
    seed = int(config.seed)
    teacher_kind = "exact_gmm" if config.teacher.kind == "exact_gmm" else "teacher"
    n_start = int(config.stage2.n_start)
    stages = []
    if config.autoencoder.enabled:
        # Not the teacher's `teacher`: the teacher learns from its latents, not its weights.
        stages.append(
            StageSpec(
                "autoencoder",
                "autoencoder",
                None,
                int(config.autoencoder.num_steps),
                None,
                seed + 7919,
            )
        )
    teacher_steps = int(config.teacher.num_steps)
    stages.append(StageSpec("teacher", teacher_kind, None, teacher_steps, None, seed))
    if student_head.finetune_target(config):
        steps = int(config.finetune.num_steps)
        stages.append(StageSpec(FINETUNE_STAGE, "finetune", None, steps, "teacher", seed + 3))
    steps = int(config.stage1.num_steps)
    stages.append(StageSpec("stage1", "stage1", n_start, steps, stages[-1].name, seed + 1))
    schedule = config_checks.round_schedule(config.stage2)
    for index, (steps, num_steps, final) in enumerate(schedule):
        stages.append(
            StageSpec(
                round_name(steps),
                "stage2",
                steps,
                num_steps,
                stages[-1].name,
                seed + 2 + steps,
                first_round=index == 0,
                final_round=final,
            )
        )
    return stages
