"""A student's output head: its parameterisation, chosen apart from its teacher's.

An epsilon teacher's x-hat = (z - sigma eps-hat) / alpha multiplies the network's error by
1 / alpha, about 160 at t = 1 on DiT's linear betas: a one-step student that kept the
teacher's epsilon output would have to predict eps to 1/160 of the precision its x-hat needs.
Two routes, each a config key, measured against each other in docs/teachers.md:

- `config.finetune.to`: the teacher fine-tuned to 'v' (or 'x') on the run's data before stage
  one (Meng et al. for Stable Diffusion), a stage of the run (`teacher_v/`) that becomes stage
  one's teacher; 'auto' does it for an epsilon teacher (EPS_TEACHER_FINETUNE).
- `config.model.student_parameterisation`: the students' own parameterisation; 'auto' is
  'both' for an epsilon stage-one teacher (EPS_TEACHER_STUDENT), that teacher's otherwise.

How the teacher's weights become the student's output layer (`convert_output_layer`):
- the same parameterisation: copied (the student starts as its teacher);
- 'both' from 'eps' (Salimans & Ho's mixture x = sigma^2 x_direct + alpha^2 x_from_eps): the
  teacher's epsilon channels fill the eps slot and the x slot starts at zero, so where signal
  dominates the fresh student is its teacher, and where noise dominates it predicts x
  directly and stage one teaches it to. A DiT's learned-variance channels, which no
  DDIM-family sampler reads, are the x slot: the output layer keeps its shape;
- any other pair of the same output width ('v' or 'x' from 'eps', ...): the weights are
  copied and their output read in the new parameterisation, so stage one starts from a
  network that is right only where the two agree (low noise for 'v' from 'eps') and
  re-learns the rest: a v fine-tune folded into stage one.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from distill_jax.diffusion import weighting
from distill_jax.diffusion.parameterisation import PARAMETERISATIONS, output_channels
from distill_jax.models.kinds import MODEL_KINDS

STUDENT_PARAMETERISATIONS = ("auto", *PARAMETERISATIONS)
FINETUNE_TARGETS = ("auto", "", "v", "x")
# What 'auto' gives an epsilon teacher's run: the route that won (docs/teachers.md).
EPS_TEACHER_FINETUNE = "v"
EPS_TEACHER_STUDENT = "both"


def finetune_target(config: ml_collections.ConfigDict) -> str:
    """The parameterisation the teacher is fine-tuned to before stage one; '' for none.

    `config.finetune.to`: 'auto' is EPS_TEACHER_FINETUNE for an epsilon teacher and none
    otherwise; a teacher that already predicts the target needs none.

    Raises:
      ValueError: an unknown choice.
    """
    choice = str(config.finetune.to)
    if choice not in FINETUNE_TARGETS:
        raise ValueError(
            f"config.finetune.to={choice!r} is unknown: accepted 'auto', '' (no fine-tune), "
            "'v' or 'x'."
        )
    teacher = str(config.model.parameterisation)
    if config.teacher.kind == "exact_gmm":  # no network to fine-tune
        return ""
    if choice == "auto":
        choice = EPS_TEACHER_FINETUNE if teacher == "eps" else ""
    return "" if choice == teacher else choice


def stage_one_teacher_parameterisation(config: ml_collections.ConfigDict) -> str:
    """The parameterisation of stage one's teacher: the fine-tune's, else the teacher's."""
    return finetune_target(config) or str(config.model.parameterisation)


def stage_one_weighting(config: ml_collections.ConfigDict) -> str:
    """Stage one's loss weighting (`config.stage1.loss_weighting`).

    'auto' is 'snr' (the epsilon MSE the teacher was trained with) for an epsilon stage-one
    teacher, `diffusion.loss_weighting` otherwise: an epsilon teacher's x-hat error grows as
    1/alpha towards t = 1 (bench/xhat_error.py), and weighted in x space that error is what
    stage one would teach; in eps space it is the teacher's own, bounded, error.

    Raises:
      ValueError: an unknown choice.
    """
    choice = str(config.stage1.loss_weighting)
    if choice == "auto":
        eps = stage_one_teacher_parameterisation(config) == "eps"
        return "snr" if eps else str(config.diffusion.loss_weighting)
    return weighting.check_weighting(choice)


def student_parameterisation(config: ml_collections.ConfigDict) -> str:
    """The students' parameterisation (`config.model.student_parameterisation`).

    'auto' is EPS_TEACHER_STUDENT for an epsilon stage-one teacher, else that teacher's.

    Raises:
      ValueError: an unknown choice, or a pair of heads that does not convert.
    """
    teacher = stage_one_teacher_parameterisation(config)
    choice = str(config.model.get("student_parameterisation", "auto"))
    if choice not in STUDENT_PARAMETERISATIONS:
        raise ValueError(
            f"config.model.student_parameterisation={choice!r} is unknown: accepted "
            f"{', '.join(STUDENT_PARAMETERISATIONS)}."
        )
    if choice == "auto":
        return EPS_TEACHER_STUDENT if teacher == "eps" else teacher
    if teacher == "both" and choice != "both":
        raise ValueError(
            f"config.model.student_parameterisation={choice!r} cannot start from a 'both' "
            "teacher's two heads: accepted 'auto' or 'both'."
        )
    if choice == "both" and teacher != "eps" and teacher != "both":
        raise ValueError(
            f"config.model.student_parameterisation='both' needs an 'eps' (or 'both') teacher, "
            f"and this teacher predicts {teacher!r}: accepted 'auto', {teacher!r}, or another "
            "single-head parameterisation."
        )
    return choice


@dataclasses.dataclass(frozen=True)
class HeadConversion:
    """How a teacher's output layer becomes its student's.

    Attributes:
      layer: the output layer's name (a key of the params' top level).
      teacher: the teacher's parameterisation.
      student: the student's parameterisation.
      channels: the data channels C (x-hat's last axis).
    """

    layer: str
    teacher: str
    student: str
    channels: int

    def applies_to(self, name: str) -> bool:
        """Whether the parameter `name` ('layer/kernel', 'layer/bias') is converted."""
        return self.teacher != self.student and name.split("/")[0] == self.layer


def student_both_shift(config: ml_collections.ConfigDict) -> float:
    """The students' `both_shift` (the log-SNR where their 'both' head weighs x and eps equally).

    `model.student_both_shift` for a 'both' head converted from an 'eps' one, else the
    teacher's own (`model.both_shift`, 0 unless set).
    """
    converted = (
        stage_one_teacher_parameterisation(config) == "eps"
        and student_parameterisation(config) == "both"
    )
    if converted:
        return float(config.model.student_both_shift)
    return float(config.model.get("both_shift", 0.0))


def student_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config.model` that builds the students' network (their head and mixture)."""
    model = ml_collections.ConfigDict(config.model.to_dict())
    model.parameterisation = student_parameterisation(config)
    model.both_shift = student_both_shift(config)
    return model


def head_conversion(config: ml_collections.ConfigDict, channels: int) -> HeadConversion:
    """The conversion from `config`'s stage-one teacher to its students' head."""
    return HeadConversion(
        layer=MODEL_KINDS[str(config.model.kind)].output_layer,
        teacher=stage_one_teacher_parameterisation(config),
        student=student_parameterisation(config),
        channels=int(channels),
    )


def convert_output_layer(
    conversion: HeadConversion, teacher_leaf: jnp.ndarray, student_leaf: jnp.ndarray
) -> jnp.ndarray:
    """The student's output kernel or bias made from the teacher's (see the module docstring).

    Both leaves have the output on the last axis, grouped as (positions, channels): a DiT's
    patch projection has p * p positions, a conv or dense layer one. Pure (runs under jit).

    Raises:
      ValueError: the two layers' widths do not fit the conversion.
    """
    c = conversion.channels
    student_width = output_channels(conversion.student, c)
    positions, rest = divmod(student_leaf.shape[-1], student_width)
    teacher_width, rest_t = divmod(teacher_leaf.shape[-1], max(positions, 1))
    if rest or rest_t or teacher_leaf.shape[:-1] != student_leaf.shape[:-1] or teacher_width < c:
        raise ValueError(
            f"the teacher's output layer {conversion.layer} {tuple(teacher_leaf.shape)} does "
            f"not convert to the student's {tuple(student_leaf.shape)} "
            f"({conversion.teacher} -> {conversion.student}, {c} channels)."
        )
    lead = teacher_leaf.shape[:-1]
    teacher = jnp.reshape(teacher_leaf, (*lead, positions, teacher_width))[..., :c]
    if conversion.student == "both":  # x slot first (zero), then the teacher's eps
        student = jnp.concatenate([jnp.zeros_like(teacher), teacher], axis=-1)
    elif student_width == c:
        student = teacher
    else:
        raise ValueError(
            f"the teacher's {conversion.teacher} head does not convert to a "
            f"{conversion.student} head: accepted 'both' from 'eps', or heads of one width."
        )
    return jnp.reshape(student, student_leaf.shape).astype(student_leaf.dtype)
