"""`Run`: the single owner of a run's workdir, its stages and their weights.

Training writes through it (`create`, `record_config`, `checkpointer`); sampling, evaluation,
export, the notebook and the CLI only read through it (`open`, `students`, `load_params`,
`denoise_fn`). Nothing else knows where a stage lives or how its weights load.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.tree_util import Partial

from distill_jax import checkpoints, config_checks, text_encoder
from distill_jax.data import sources
from distill_jax.diffusion import gmm, guidance
from distill_jax.interop import pipeline as pipeline_lib
from distill_jax.interop import vae as vae_reader
from distill_jax.models import autoencoder, denoiser
from distill_jax.run import captions as captions_lib
from distill_jax.run import stages as stages_lib
from distill_jax.run import workdir as workdir_lib
from distill_jax.run.latents import Latents, read_cached

PyTree = Any


def _dataset_info(config: ml_collections.ConfigDict) -> sources.DatasetInfo:
    _, info = sources.load_source(config.data, split=config.data.train_split, seed=config.seed)
    return info


def _diffusion_info(
    config: ml_collections.ConfigDict, image_info: sources.DatasetInfo
) -> sources.DatasetInfo:
    """What the diffusion models see: the images, or on a latent run the latents' shape."""
    if not config.autoencoder.enabled:
        return image_info
    if len(image_info.shape) != 3:
        raise ValueError(
            f"config.autoencoder.enabled=True needs image data [H, W, C]; dataset "
            f"{image_info.name!r} has examples of shape {image_info.shape}."
        )
    if config.autoencoder.pipeline:
        vae_config = stages_lib.imported_vae_config(config)
        try:
            shape = vae_reader.vae_latent_shape(vae_config, image_info.shape)
        except ValueError as error:
            raise ValueError(
                f"The data {image_info.name!r} does not fit the VAE of "
                f"{config.autoencoder.pipeline}: {error}."
            ) from None
    else:
        shape = autoencoder.latent_shape(config.autoencoder, image_info.shape)
    return dataclasses.replace(image_info, shape=shape)


@functools.lru_cache(maxsize=2)
def _pipeline_encoder(folder: str, clip_skip: int, max_tokens: int, dtype: str):
    """A pipeline's text encoder, loaded once per process."""
    return pipeline_lib.text_encoder(folder, clip_skip or None, max_tokens, dtype)


def _identity(x: jax.Array) -> jax.Array:
    return x


@dataclasses.dataclass
class Run:
    """A run: its workdir, config, dataset info and the stages the config makes.

    `image_info` describes the dataset's images; `info` what the diffusion models see (the
    same, or on a latent run the latents: shape (H / f, W / f, latent_channels)).

    Build one with `Run.create` (to train: validates the config against the workdir's record,
    writes nothing) or `Run.open` (to read a run that exists).
    """

    workdir: epath.Path | None
    config: ml_collections.ConfigDict
    image_info: sources.DatasetInfo
    stages: list[stages_lib.StageSpec]
    info: sources.DatasetInfo = dataclasses.field(init=False)
    _codec: tuple | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.info = _diffusion_info(self.config, self.image_info)
        for spec in self.stages:  # a latent that does not fit the U-Net fails here, not later
            try:
                self.model(spec)
            except ValueError as error:
                if not self.latent or spec.stage_kind.on_images:
                    raise
                height, width, _ = self.image_info.shape
                latent = "x".join(str(d) for d in self.info.shape)
                raise ValueError(
                    f"The latent of this run ({latent}: {height}x{width} images through the "
                    f"autoencoder) does not fit the U-Net: {error}"
                ) from None

    @property
    def latent(self) -> bool:
        """Whether diffusion runs on the latents of an autoencoder stage."""
        return bool(self.config.autoencoder.enabled)

    @property
    def text(self) -> bool:
        """Whether the run conditions on text (prompts) instead of class labels."""
        return bool(self.config.text.enabled)

    def text_encoder(self) -> text_encoder.TextConditioner:
        """The frozen text encoder of a text run (loaded once per process).

        An imported text-to-image teacher's own (config.text.pipeline), else the bundled MiniLM.
        Both take `encode(prompts) -> (conditions [P, L, D], truncated [P])`.
        """
        text = self.config.text
        if text.pipeline:
            return _pipeline_encoder(
                str(text.pipeline),
                int(text.clip_skip),
                int(text.max_tokens),
                str(self.config.train.frozen_dtype),
            )
        return text_encoder.load_text_encoder(text.encoder_dir, int(text.max_tokens))

    @property
    def null_condition(self) -> int | np.ndarray:
        """What guidance's unconditional half sees: the null class, or the empty prompt."""
        if not self.text:
            return int(self.info.num_classes)
        if self.workdir is None:  # a run described for a plan: its shape, no encoder loaded
            width = stages_lib.text_width(self.config)
            return np.zeros((int(self.config.text.max_tokens), width), np.float32)
        return self.text_encoder().encode([""])[0][0]

    @classmethod
    def create(
        cls,
        config: ml_collections.ConfigDict,
        workdir: epath.PathLike,
        *,
        allow_config_change: bool = False,
    ) -> Run:
        """A run to train: `config` is validated and compared with the workdir's record."""
        workdir = epath.Path(workdir).absolute()
        workdir_lib.check_config(config, workdir, allow_config_change=allow_config_change)
        config = workdir_lib.with_kept_files(config, workdir)
        return cls(workdir, config, _dataset_info(config), stages_lib.plan_stages(config))

    @classmethod
    def describe(cls, config: ml_collections.ConfigDict) -> Run:
        """A run of `config` that exists nowhere, to plan it (`distill_jax.planning`).

        The config is validated and its stages built; there is no workdir (workdir is None)
        and the dataset is described by its metadata alone (`sources.dataset_info`).
        """
        config_checks.validate_config(config)
        info = sources.dataset_info(config.data, seed=config.seed)
        return cls(None, config, info, stages_lib.plan_stages(config))

    @classmethod
    def open(
        cls, workdir: epath.PathLike, *, eval_config: ml_collections.ConfigDict | None = None
    ) -> Run:
        """The run recorded in `workdir`; `eval_config` replaces its config.eval."""
        workdir = epath.Path(workdir).absolute()
        config = workdir_lib.with_kept_files(workdir_lib.read_config(workdir), workdir)
        if eval_config is not None:
            config.eval = ml_collections.ConfigDict(eval_config.to_dict())
        config_checks.validate_config(config)
        return cls(workdir, config, _dataset_info(config), stages_lib.plan_stages(config))

    def locked(self):
        """Context manager holding the workdir's lock (see `workdir.locked`)."""
        return workdir_lib.locked(self.workdir)

    def record_config(self) -> None:
        """Record this run's config in the workdir (see `workdir.record_config`)."""
        workdir_lib.record_config(self.config, self.workdir)

    @property
    def bounds(self) -> dict[str, float]:
        """The schedule's log-SNR clip, as keyword arguments for the diffusion functions."""
        d = self.config.diffusion
        return dict(logsnr_min=float(d.logsnr_min), logsnr_max=float(d.logsnr_max))

    def path(self, name: str) -> epath.Path:
        """A file or folder of the workdir layout (see `workdir`), e.g. run.path('eval')."""
        return self.workdir / name

    def stage(self, name: str) -> stages_lib.StageSpec:
        """The stage called `name` ('teacher', 'stage1', 'stage2/steps_0004', ...)."""
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise ValueError(
            f"No stage {name!r} in this run: accepted {[s.name for s in self.stages]}."
        )

    def directory(self, spec: stages_lib.StageSpec) -> epath.Path:
        """The stage's Orbax directory."""
        return self.workdir / spec.name

    def finished(self, spec: stages_lib.StageSpec) -> dict | None:
        """The stage's FINISHED.json record, or None while it is unfinished."""
        if spec.stage_kind.model is None:
            return {"kind": spec.kind}  # nothing to train: always ready
        return checkpoints.stage_finished(self.directory(spec))

    def students(self) -> dict[int, stages_lib.StageSpec]:
        """{N: stage} of every finished student: stage one at n_start, then each round."""
        return {
            spec.steps: spec
            for spec in self.stages
            if spec.stage_kind.takes_w and self.finished(spec) is not None
        }

    def student(self, steps: int) -> stages_lib.StageSpec:
        """The finished student that samples in `steps` steps; fails listing those that exist."""
        found = self.students()
        if steps not in found:
            shown = ", ".join(str(n) for n in sorted(found)) or "none (run `distill-jax distill`)"
            raise ValueError(
                f"No finished student samples in {steps} steps in {self.workdir}; the step "
                f"counts that exist are: {shown}."
            )
        return found[steps]

    def model(self, spec: stages_lib.StageSpec) -> nn.Module | None:
        """The stage's network (dropout from its config section); None if it has none."""
        kind = spec.stage_kind
        if kind.model is None:
            return None
        section = self.config[kind.section]
        dropout = float(section.dropout if "dropout" in section else self.config.model.dropout)
        return kind.model(self.config, self.data_info(spec), dropout)

    def data_info(self, spec: stages_lib.StageSpec) -> sources.DatasetInfo:
        """What the stage trains on: the images (`image_info`) or the diffusion data (`info`)."""
        return self.image_info if spec.stage_kind.on_images else self.info

    def init_params(self, spec: stages_lib.StageSpec, rng: jax.Array) -> PyTree:
        """Freshly initialised parameters of the stage's network (pure in `rng`)."""
        shape = tuple(self.data_info(spec).shape)
        return spec.stage_kind.init(self.model(spec), rng, data_shape=shape)

    def abstract_params(self, spec: stages_lib.StageSpec) -> PyTree:
        """The shapes and dtypes of the stage's parameters (jax.eval_shape, no computation)."""
        return jax.eval_shape(lambda: self.init_params(spec, jax.random.PRNGKey(0)))

    def load_params(
        self,
        spec: stages_lib.StageSpec,
        *,
        which: str = "ema_params",
        directory: epath.PathLike | None = None,
        shardings: PyTree = None,
    ) -> PyTree:
        """The finished stage's weights, read through its Orbax manager.

        Args:
          spec: the stage; for one without a network, the state its denoiser needs (the
            Gaussian mixture).
          which: 'ema_params' (what every reader uses) or 'params'.
          directory: read another run's stage directory of the same kind instead (a teacher
            trained elsewhere); it is checked like the run's own.
          shardings: a pytree of shardings matching the params to restore them already
            sharded (default: the first local device).

        Raises:
          FileNotFoundError: the stage is missing or unfinished. ValueError: its checkpoint
            holds another model's parameters.
        """
        if spec.stage_kind.model is None:
            return sources.gmm_from_config(self.config.data.gmm)
        source = epath.Path(directory).absolute() if directory else self.directory(spec)
        if not source.exists():
            raise FileNotFoundError(
                f"No {spec.name} checkpoint at {source}: train it first (`distill-jax run`)."
            )
        if checkpoints.stage_finished(source) is None:
            raise FileNotFoundError(
                f"The {spec.name} stage at {source} has not finished training (no "
                f"{checkpoints.FINISHED_FILE}); finish it with `distill-jax run` first."
            )
        self._check_latents(spec, checkpoints.stage_finished(source), source)
        abstract = self.abstract_params(spec)
        if shardings is not None:
            abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                abstract,
                shardings,
            )
        return checkpoints.restore_params(
            source, abstract, which=which, what=f"{spec.name} checkpoint"
        )

    def latents(self) -> Latents:
        """The latent space of this (latent) run, as its finished autoencoder recorded it.

        Raises:
          FileNotFoundError: the autoencoder stage is missing or unfinished.
        """
        spec = self.stage("autoencoder") if self.latent else None
        record = self.finished(spec) if spec is not None else None
        latents = Latents.from_record(record)
        if latents is None:
            raise FileNotFoundError(
                f"This latent run has no finished autoencoder in "
                f"{self.workdir / 'autoencoder'}: train it first (`distill-jax train` or "
                "`distill-jax run`)."
            )
        return latents

    def finish_record(self, spec: stages_lib.StageSpec) -> dict:
        """What FINISHED.json records of a trained stage.

        Its name and, for a diffusion stage of a latent run, the latents it learnt on (checked
        when it is loaded as a teacher).
        """
        record = {"stage": spec.name}
        if self.latent and not spec.stage_kind.on_images:
            record.update(self.latents().to_record())
        return record

    def _check_latents(self, spec: stages_lib.StageSpec, record: dict, source) -> None:
        """Refuse a diffusion stage trained on other latents than this run's autoencoder's."""
        if spec.stage_kind.on_images or not self.latent:
            return
        theirs, ours = Latents.from_record(record), self.latents()
        if theirs is None or not theirs.matches(ours):
            shown = "pixels" if theirs is None else f"latents {theirs}"
            raise ValueError(
                f"The {spec.name} stage at {source} was trained on {shown}, but this run's "
                f"autoencoder gives latents {ours}: use the autoencoder it was trained with, "
                "or train it again on these latents."
            )

    def codec(self) -> tuple[Partial, Partial]:
        """(encode, decode) between images and the diffusion data, as pytree Partials.

        Identity functions on a pixel run; on a latent run the finished autoencoder's EMA
        weights with the recorded latent scale and shift (see `autoencoder.make_codec`).
        """
        if not self.latent:
            return Partial(_identity), Partial(_identity)
        if self._codec is None:  # loaded once per Run: every sample() call decodes
            spec = self.stage("autoencoder")
            latents = self.latents()
            params = self.load_params(spec)
            self._codec = autoencoder.make_codec(
                self.model(spec), params, latents.scale, latents.shift
            )
        return self._codec

    def train_source(self, spec: stages_lib.StageSpec) -> Sequence | None:
        """The stage's training examples, when they are not config.data's images (None).

        For a diffusion stage of a latent run: the scaled, cached latents of the train split.
        With an imported pipeline's text encoder, the captions encoded by it (beside the
        latents on a latent run).
        """
        if spec.stage_kind.on_images:
            return None
        split = self.config.data.train_split
        pipeline_text = self.text and bool(self.config.text.pipeline)
        if not self.latent:
            return self.pipeline_captions(split) if pipeline_text else None
        directory = self.directory(self.stage("autoencoder"))
        conditions = self.pipeline_conditions(split)[1] if pipeline_text else None
        return read_cached(directory, self.latents(), conditions)

    def pipeline_conditions(self, split: str) -> tuple[Sequence, Sequence]:
        """(source, conditions [N, L, D]) of `split`, captions encoded by the pipeline's encoder.

        The pipeline's text encoder (config.text.pipeline) encodes every distinct caption once,
        in place of the conditions stored with the dataset (MiniLM's, zero at padding), into
        the workdir's cache, which the conditions read lazily (`run.captions`).
        """
        return captions_lib.caption_conditions(self, split)

    def pipeline_captions(self, split: str) -> Sequence:
        """`split` of the captioned data, each caption's condition the pipeline encoder's."""
        return sources.with_conditions(*self.pipeline_conditions(split))

    def denoise_fn(self, spec: stages_lib.StageSpec, params: PyTree = None) -> Partial:
        """The stage's x-hat denoiser(z, t, conditions, w) as a Partial (weights loaded if None).

        Teachers ignore w (see `guided_teacher_fn` for the guided one); students require it.
        """
        if params is None:
            params = self.load_params(spec)
        if spec.stage_kind.model is None:
            return gmm.make_gmm_denoise_fn(params, **self.bounds)
        return denoiser.make_denoise_fn(self.model(spec), params)

    def guided_teacher_fn(
        self, *, unguided_steps: str = "none", params: PyTree = None, null: Any = None
    ) -> Partial:
        """The guided teacher, (1 + w) xhat(z, c) - w xhat(z, null) in one batched call.

        unguided_steps: 'none', 'some' or 'all' steps with w = 0, which need only the
        conditional half (`guidance.make_guided_denoise_fn`). params: the teacher's weights
        (loaded when None). null: the unconditional input (a negative prompt's encoding
        [L, D]); the run's `null_condition` when None.
        """
        cond_fn = self.denoise_fn(self.stage("teacher"), params)
        null = self.null_condition if null is None else null
        return guidance.make_guided_denoise_fn(
            cond_fn, null_condition=null, unguided_steps=unguided_steps
        )

    def checkpointer(self, spec: stages_lib.StageSpec) -> checkpoints.StageCheckpointer:
        """The stage's checkpoint manager for training.

        Its save interval and retention come from config.train.
        """
        return checkpoints.StageCheckpointer(
            self.directory(spec),
            keep=int(self.config.train.keep_checkpoints),
            save_every=int(self.config.train.checkpoint_every),
        )
