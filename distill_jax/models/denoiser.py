"""From a config to a model, its parameters, and the x-hat denoiser the diffusion code uses.

`make_denoise_fn` returns the one callable every sampler and loss takes,
denoise_fn(z, t, conditions, w) -> xhat. It serves teachers and students alike: a model without a
guidance branch ignores w (None is accepted), a student requires it. The callable is a
`jax.tree_util.Partial` whose bound arguments are the params (and dropout rng), so it is a
pytree: jit a function that takes it as an argument and new params are new leaf values, not
a new trace. The model itself rides in the Partial's static function, compared by value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from distill_jax import trees
from distill_jax.attention import check_implementation
from distill_jax.diffusion.guidance import as_condition
from distill_jax.diffusion.parameterisation import (
    check_parameterisation,
    network_input,
    xhat_from_output,
)
from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_schedule_cosine
from distill_jax.models import kinds, student_head
from distill_jax.models.embeddings import (
    GUIDANCE_BRANCH,
    GUIDANCE_HEAD,
    GUIDANCE_HEADS,
    STUDENT_EXTRA,
)
from distill_jax.models.kinds import MODEL_KINDS
from distill_jax.models.remat import check_policy

Params = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(
    model_config: ml_collections.ConfigDict,
    *,
    data_shape: Sequence[int],
    num_classes: int,
    use_guidance: bool,
    text_dim: int = 0,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
) -> nn.Module:
    """Build the network named by `model_config.kind` (a key of `kinds.MODEL_KINDS`).

    Args:
      model_config: `config.model` (see distill_jax.config.base_config).
      data_shape: one example's shape, (H, W, C) for the image kinds, or (D,) for 'mlp'.
      num_classes: real classes; the embedding gets one more row for the NULL class.
      use_guidance: True for a distilled student (adds the guidance-weight branch).
      text_dim: width of a text condition's token states (a text-conditioned U-Net); 0 for
        class labels.
      logsnr_min: `config.diffusion.logsnr_min`, the schedule's lower bound.
      logsnr_max: `config.diffusion.logsnr_max`, the schedule's upper bound.

    Raises:
      ValueError: unknown kind, dtype or parameterisation, a data_shape or conditioning that
        the kind does not take, or sizes that do not fit it (an image size the U-Net cannot
        halve between its levels).
    """
    m = model_config
    kind = _check_model_keys(m)
    data_shape = tuple(int(d) for d in data_shape)
    wanted = "(H, W, C)" if kind.images else "(D,)"
    if len(data_shape) != (3 if kind.images else 1):
        raise ValueError(
            f"config.model.kind={m.kind!r} needs data_shape {wanted}; got {data_shape}."
        )
    if text_dim and not kind.text:
        raise ValueError(f"config.model.kind={m.kind!r} takes class labels only, not text.")
    common = dict(
        num_classes=int(num_classes),
        use_guidance=bool(use_guidance),
        guidance_fourier_dim=int(m.guidance_fourier_dim),
        guidance_head=str(m.guidance_head),
        parameterisation=m.parameterisation,
        emb_dim=int(m.emb_dim),
        dropout=float(m.dropout),
        dtype=DTYPES[m.dtype],
        logsnr_min=float(logsnr_min),
        logsnr_max=float(logsnr_max),
        both_shift=float(m.get("both_shift", 0.0)),
    )
    return kind.build(m, data_shape, int(text_dim), common)


def _check_model_keys(m: ml_collections.ConfigDict) -> kinds.ModelKind:
    """The kind of `m`, after the keys every kind shares are checked."""
    if m.kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind={m.kind!r} is unknown: accepted {tuple(MODEL_KINDS)}.")
    if m.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r} is unknown: accepted {tuple(DTYPES)}.")
    check_parameterisation(m.parameterisation)
    check_implementation(str(m.get("attention", "xla")))
    check_policy(str(m.get("remat", "none")))
    if m.guidance_head not in GUIDANCE_HEADS:
        raise ValueError(
            f"config.model.guidance_head={m.guidance_head!r} is unknown: accepted {GUIDANCE_HEADS}."
        )
    return MODEL_KINDS[m.kind]


def _dummy_inputs(model: nn.Module, data_shape: Sequence[int]) -> tuple:
    z = jnp.zeros((1, *data_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    text_dim = getattr(model, "text_dim", 0)
    # A text model's parameters do not depend on the number of tokens: one (masked) token.
    conditions = jnp.zeros(
        (1, 1, text_dim) if text_dim else (1,), jnp.float32 if text_dim else jnp.int32
    )
    w = jnp.zeros((1,), jnp.float32) if model.use_guidance else None
    return z, t, conditions, w


def init_params(model: nn.Module, rng: jax.Array, *, data_shape: Sequence[int]) -> Params:
    """Initialise the 'params' collection with a dummy batch of one example.

    Pure in `rng`, so `jax.eval_shape(lambda r: init_params(model, r, data_shape=s), rng)`
    gives the parameter shapes without computing them (for sharded initialisation).
    """
    z, t, conditions, w = _dummy_inputs(model, data_shape)
    variables = jax.jit(lambda key: model.init({"params": key}, z, t, conditions, w, train=False))(
        rng
    )
    return variables["params"]


@dataclasses.dataclass(frozen=True)
class _DenoiserApply:
    """Static half of a denoise_fn: the module and the train flag, hashed by value."""

    model: nn.Module
    train: bool

    def __call__(
        self,
        params: Params,
        dropout_rng: jax.Array | None,
        z: jax.Array,
        t: jax.Array,
        conditions: jax.Array,
        w: jax.Array | None = None,
    ) -> jax.Array:
        conditions = as_condition(conditions)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), conditions.shape[:1])
        rngs = {"dropout": dropout_rng} if self.train else None
        logsnr = logsnr_schedule_cosine(
            t, logsnr_min=self.model.logsnr_min, logsnr_max=self.model.logsnr_max
        )
        net_z = network_input(z, logsnr, parameterisation=self.model.parameterisation)
        output = self.model.apply(
            {"params": params}, net_z, t, conditions, w, train=self.train, rngs=rngs
        )
        return xhat_from_output(
            output,
            z,
            logsnr,
            parameterisation=self.model.parameterisation,
            both_shift=self.model.both_shift,
        )


def make_denoise_fn(
    model: nn.Module,
    params: Params,
    *,
    train: bool = False,
    dropout_rng: jax.Array | None = None,
) -> jax.tree_util.Partial:
    """The x-hat denoiser of `model` with `params`: denoise_fn(z, t, conditions, w=None) -> xhat.

    z [B, ...] noisy data, t [B] (or scalar) times in [0, 1], conditions [B] int32 in
    [0, num_classes] (or a text model's token states [B, L, D]), w [B] (or scalar) guidance
    weights: required for a model with a guidance branch, ignored (may be None) for one
    without. Returns xhat with z's shape and dtype.

    With train=True dropout is on and uses `dropout_rng` for every call of the returned
    function; make a new denoise_fn (cheap) with a fresh key per step.
    """
    if train and dropout_rng is None:
        raise ValueError("make_denoise_fn(train=True) needs a dropout_rng.")
    return jax.tree_util.Partial(
        _DenoiserApply(model, bool(train)), params, dropout_rng if train else None
    )


def _student_only(name: str) -> bool:
    """Whether the parameter `name` belongs to a part only a student has."""
    parts = name.split("/")
    return bool({GUIDANCE_BRANCH, GUIDANCE_HEAD} & set(parts)) or any(
        STUDENT_EXTRA in part for part in parts
    )


def student_params_from_teacher(
    teacher_params: Params,
    student_init_params: Params,
    head: student_head.HeadConversion | None = None,
) -> Params:
    """Student params = the teacher's weights plus the student's fresh guidance branch.

    Every subtree of the student is taken from the teacher except those named `GUIDANCE_BRANCH`
    or `GUIDANCE_HEAD`, or the extra ResBlocks named with `STUDENT_EXTRA`, that the teacher
    lacks, which keep their initial values (last layer zero, so the student equals the teacher
    for every w). A teacher that has a guidance branch itself (a distilled student) passes it
    on, so the copy never throws away what a teacher knows about w.

    A student whose parameterisation differs from its teacher's (`head`) has the teacher's
    output layer converted into its own (`student_head.convert_output_layer`).

    Pure tree surgery, so it runs inside `jax.jit` (sharded initialisation).

    Raises:
      ValueError: naming the first parameter that only one side has or whose shapes differ.
    """
    teacher = trees.named_leaves(teacher_params)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(student_init_params)
    names = [trees.leaf_name(path) for path, _ in with_path]
    extra = sorted(set(teacher) - set(names))
    if extra:
        raise ValueError(f"teacher params have {extra[0]} which the student lacks.")
    merged = []
    for name, (_, leaf) in zip(names, with_path, strict=True):
        if name not in teacher:
            if not _student_only(name):
                raise ValueError(f"student params have {name} which the teacher lacks.")
            merged.append(leaf)  # the fresh guidance branch or extra blocks
        elif head is not None and head.applies_to(name):
            merged.append(student_head.convert_output_layer(head, teacher[name], leaf))
        elif jnp.shape(teacher[name]) != jnp.shape(leaf):
            raise ValueError(
                f"teacher and student params differ at {name}: shape "
                f"{jnp.shape(teacher[name])} vs {jnp.shape(leaf)}."
            )
        else:
            merged.append(teacher[name])
    return jax.tree_util.tree_unflatten(treedef, merged)


def count_params(params: Params) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(jnp.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
