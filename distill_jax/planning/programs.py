"""The programs a run executes, built at their real sizes with abstract arguments.

`train_programs` lowers every trainable stage's real train step: `drivers.BUILDERS` makes the
stage (loss, optimiser, the frozen teacher as the step's argument) and `loop.compile_stage`
its shardings and jitted step, exactly as training does, but the state, the batch and the
teacher are `jax.ShapeDtypeStruct`s (`jax.eval_shape`), so no weight is ever allocated.
`sampler_programs` lowers the students' samplers and the teacher's guided sampler (and, on a
latent run, the decoder after them) for one chip. Lowered programs compile for whatever
devices the mesh holds: a TPU slice's abstract devices or this machine's CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from distill_jax import parallel
from distill_jax.data import loader
from distill_jax.diffusion import samplers
from distill_jax.models import autoencoder
from distill_jax.run import Run, StageSpec, stages
from distill_jax.training import drivers, loop

PyTree = Any
STUDENT_STEPS = (1, 4, 8)


@dataclasses.dataclass
class Program:
    """One program to compile and what one call of it stands for.

    Attributes:
      name: the stage's name, or 'sample/student_0004' / 'sample/teacher_1024'.
      kind: 'train' (one train step) or 'sample' (one sampler call).
      batch: images per call, over the whole mesh.
      calls: how often the stage calls it (its training steps; 1 for a sampler).
      loop_trips: network evaluations per call inside the sampler's `fori_loop` (XLA's cost
        analysis counts a loop body once, so the body's cost is multiplied by this; 1 for a
        train step, which has no loop).
      lowered: the lowered program (None when it cannot run: `problem` says why).
      problem: why the program cannot run on this mesh (a batch that does not split), or ''.
      same_as: the name of an earlier program whose lowered text is identical ('' if none):
        it is compiled once.
      argument_bytes: bytes of its arguments on one device (their shards), known before
        compiling: what a larger 'fsdp' axis can shard further.
    """

    name: str
    kind: str
    batch: int
    calls: int
    loop_trips: int = 1
    lowered: Any = None
    problem: str = ""
    same_as: str = ""
    argument_bytes: float = 0.0


def _abstract(tree: PyTree, shardings: PyTree) -> PyTree:
    """`tree` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs carrying `shardings`."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(
            np.shape(leaf),
            getattr(leaf, "dtype", None) or np.asarray(leaf).dtype,
            sharding=sharding,
        ),
        tree,
        shardings,
    )


def per_device_bytes(tree: PyTree) -> float:
    """Bytes one device holds of `tree`'s ShapeDtypeStructs (each leaf's shard)."""
    leaves = jax.tree.leaves(tree)
    return float(
        sum(
            np.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
            for leaf in leaves
        )
    )


def _conditions(run: Run, batch: int) -> jax.ShapeDtypeStruct:
    """The batch's conditions: class labels [B], or a text run's token states [B, L, D]."""
    if run.text:
        shape = (batch, int(run.config.text.max_tokens), stages.text_width(run.config))
        return jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ShapeDtypeStruct((batch,), jnp.int32)


def _abstract_teacher(run: Run, spec: StageSpec) -> PyTree:
    """What the stage's builder takes as its teacher: the teacher's params, abstractly.

    A teacher without a network (the exact Gaussian mixture) is built from the config.
    """
    if spec.teacher is None:
        return None
    teacher_spec = run.stage(spec.teacher)
    if teacher_spec.stage_kind.model is None:
        return run.load_params(teacher_spec)
    return run.abstract_params(teacher_spec)


def train_program(run: Run, spec: StageSpec, mesh: jax.sharding.Mesh) -> Program:
    """The stage's train step lowered on `mesh` (or its `problem`: a batch that cannot split)."""
    stage = drivers.BUILDERS[spec.kind](run, spec, _abstract_teacher(run, spec))
    program = Program(spec.name, "train", stage.batch_size, spec.num_steps)
    try:
        loader.check_batch_size(stage.batch_size, devices=mesh.size, key=f"{spec.name} batch")
        micro = stage.batch_size // stage.microbatches
        loader.check_batch_size(micro, devices=mesh.size, key=f"{spec.name} microbatch")
    except ValueError as error:
        program.problem = str(error).split(":")[0]
        return program
    compiled = loop.compile_stage(stage, mesh)
    shape = tuple(run.data_info(spec).shape)
    batch = {
        "x": jax.ShapeDtypeStruct((stage.batch_size, *shape), jnp.float32),
        "condition": _conditions(run, stage.batch_size),
    }
    batch = jax.tree.map(lambda a: a.update(sharding=compiled.batch_sharding), batch)
    teacher = _abstract(loop.frozen(stage.teacher, stage.frozen_dtype), compiled.teacher_sharding)
    arguments = (compiled.abstract_state, batch, teacher)
    program.lowered = compiled.step.lower(*arguments)
    program.argument_bytes = per_device_bytes(arguments)
    return program


def wanted(name: str, selection: tuple[str, ...]) -> bool:
    """Whether the program `name` is selected: any selection is a prefix of it (none: all)."""
    return not selection or name.startswith(tuple(selection))


def _imported(run: Run, spec: StageSpec) -> bool:
    """Whether an import provides the stage (nothing to train): its VAE, its teacher."""
    if spec.name == "autoencoder":
        return bool(run.config.autoencoder.pipeline)
    return spec.name == "teacher" and bool(run.config.model.get("from_import", False))


def train_programs(
    run: Run, mesh: jax.sharding.Mesh, selection: tuple[str, ...] = ()
) -> list[Program]:
    """The trainable stages' train steps, lowered on `mesh`.

    Stages without a train step, and those an import provides, are skipped.

    selection: name prefixes of the stages to lower ('teacher', 'stage2'); empty: all.
    """
    programs, seen = [], {}
    for spec in run.stages:
        if spec.kind not in drivers.BUILDERS or not wanted(spec.name, selection):
            continue
        if _imported(run, spec):
            continue
        program = train_program(run, spec, mesh)
        if program.lowered is not None:
            text = program.lowered.as_text()
            program.same_as = seen.setdefault(text, spec.name)
            program.same_as = "" if program.same_as == spec.name else program.same_as
        programs.append(program)
    return programs


def _sampled_stages(run: Run) -> list[tuple[str, StageSpec | None, int]]:
    """(program name, student stage or None for the teacher, steps) of the samplers to plan.

    The students with 1, 4 and 8 steps that the run makes, and the guided teacher at
    stage2.n_start steps (the sampler the students are distilled from).
    """
    students = {spec.steps: spec for spec in run.stages if spec.stage_kind.takes_w}
    chosen = [(f"sample/student_{n:04d}", students[n], n) for n in STUDENT_STEPS if n in students]
    n_start = int(run.config.stage2.n_start)
    if run.stage("teacher").stage_kind.model is not None:
        chosen.append((f"sample/teacher_{n_start:04d}", None, n_start))
    return chosen


def _decoder(run: Run, params: PyTree):
    """A latent run's decoder with abstract weights, else None (pixels need no decoding)."""
    if not run.latent:
        return None
    spec = run.stage("autoencoder")
    return autoencoder.make_codec(run.model(spec), params, 1.0)[1]


def _sampler(run: Run, spec: StageSpec | None, steps: int):
    """(params, decoder params, z, conditions, w, key) -> images: one sampler call."""
    stochastic = spec is not None and bool(run.config.stage2.stochastic)
    name = "stochastic" if stochastic else "ddim"

    def sample(params, decoder_params, z, conditions, w, key):
        if spec is None:
            fn = run.guided_teacher_fn(params=params)
        else:
            fn = run.denoise_fn(spec, params)
        x = samplers.run_sampler(name, fn, z, conditions, w, key, steps=steps, **run.bounds)
        decode = _decoder(run, decoder_params)
        return x if decode is None else decode(x)

    return sample


def sampler_programs(
    run: Run, device, batch: int, selection: tuple[str, ...] = ()
) -> list[Program]:
    """The samplers' programs on one chip (`device`), `batch` images per call.

    Parameters are replicated on every chip when serving, so one chip's program is the
    per-chip figure; a latent run's samplers decode their latents too. selection: as in
    `train_programs` ('sample', 'sample/student').
    """
    mesh = parallel.make_mesh(1, devices=[device])
    one = NamedSharding(mesh, jax.sharding.PartitionSpec())
    decoder_params = None
    if run.latent:
        decoder_params = run.abstract_params(run.stage("autoencoder"))
    programs = []
    for name, spec, steps in _sampled_stages(run):
        if not wanted(name, selection):
            continue
        params = run.abstract_params(spec if spec is not None else run.stage("teacher"))
        arguments = (
            params,
            decoder_params,
            jax.ShapeDtypeStruct((batch, *run.info.shape), jnp.float32),
            _conditions(run, batch),
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.uint32),
        )
        arguments = _abstract(arguments, jax.tree.map(lambda _: one, arguments))
        lowered = jax.jit(_sampler(run, spec, steps)).lower(*arguments)
        program = Program(name, "sample", batch, 1, loop_trips=steps, lowered=lowered)
        program.argument_bytes = per_device_bytes(arguments)
        programs.append(program)
    return programs
