"""`plan_run`: compile a config's programs for a TPU slice on this machine, and report them.

For the slice named like gcloud names it (`topologies.topology`), with the mesh of --mesh or of
config.train, every trainable stage's real train step and the samplers are lowered with
abstract arguments (`programs`), compiled ahead of time for the slice's abstract devices, and
measured (`estimate`): per-chip memory against HBM, FLOPs and bytes, a roofline time per call,
images per second per chip, and each stage's predicted time at its step count. A stage that
does not fit is compiled again at the smallest larger 'fsdp' size the memory estimate allows,
and the report names that mesh when it fits. Nothing is trained and no weights exist.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from distill_jax import files, parallel, topologies
from distill_jax.planning import estimate as estimate_lib
from distill_jax.planning import programs as programs_lib
from distill_jax.run import Run

# How many larger 'fsdp' sizes, then (microbatches, remat) settings, a stage that does not
# fit is compiled at before giving up.
MAX_FSDP_TRIES = 2
MAX_SAVER_TRIES = 3


def parse_mesh(text: str | None, config: ml_collections.ConfigDict, chips: int) -> tuple[int, int]:
    """(data, fsdp) sizes from --mesh=DATAxFSDP (or config.train), checked against `chips`.

    DATA may be -1 (chips / FSDP). Raises ValueError unless DATA x FSDP = chips.
    """
    if text:
        parts = text.lower().split("x")
        try:
            data, fsdp = (int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"--mesh={text!r} is invalid: accepted DATAxFSDP, e.g. {chips}x1 or -1x2."
            ) from None
    else:
        data, fsdp = int(config.train.mesh_data_axis), int(config.train.mesh_fsdp_axis)
    if fsdp < 1 or chips % fsdp:
        raise ValueError(
            f"--mesh: an fsdp size of {fsdp} does not divide the {chips} chips: accepted a "
            f"divisor of {chips}."
        )
    data = chips // fsdp if data == -1 else data
    if data * fsdp != chips:
        raise ValueError(
            f"--mesh: {data}x{fsdp} = {data * fsdp} devices, but the slice has {chips} chips: "
            f"accepted DATAxFSDP with DATA x FSDP = {chips} (e.g. {chips}x1, -1x{fsdp})."
        )
    return data, fsdp


def measured_cpu_chip(size: int = 1024, megabytes: int = 256) -> topologies.ChipSpec:
    """The CPU here as a 'chip': its float32 matmul rate and its copy bandwidth, measured.

    Not a data sheet: what XLA reaches here on a dense matmul and on a large copy, the best
    a step's matmuls and memory traffic can do on this machine.
    """
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        out = matmul(a)
    out.block_until_ready()
    flops = 2 * size**3 * repeats / (time.perf_counter() - start)
    big = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    copy(big).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = copy(big)
    out.block_until_ready()
    bandwidth = 2 * big.nbytes * repeats / (time.perf_counter() - start)  # read + write
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    source = (
        f"measured here ({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores): float32 {size}^3 matmul {flops / 1e9:.1f} GFLOP/s, {megabytes} MiB "
        f"read+write {bandwidth / 1e9:.1f} GB/s"
    )
    return topologies.ChipSpec("cpu", flops, float(memory), bandwidth, source)


def _compile(program, chip, chips, log) -> estimate_lib.Estimate:
    """Compile `program` and estimate it; a compiler refusing it for want of HBM is an answer."""
    start = time.perf_counter()
    try:
        compiled = program.lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        result = estimate_lib.out_of_memory(program, chip, str(error))
        if result is None:
            raise
        result.compile_seconds = time.perf_counter() - start
        log(f"[plan] {program.name}: does not fit ({result.compile_seconds:.1f} s)")
        return result
    seconds = time.perf_counter() - start
    log(f"[plan] {program.name}: compiled in {seconds:.1f} s")
    return estimate_lib.estimate(program, compiled, chip, chips, seconds)


def _advise(run, result, spec_name, devices, fsdp, chip, log) -> str:
    """A mesh with a larger 'fsdp' axis on which the stage's step fits, compiled to check."""
    chips = len(devices)
    tried = estimate_lib.fsdp_candidates(
        result, fsdp=fsdp, chips=chips, state_bytes=result.argument_bytes
    )[:MAX_FSDP_TRIES]
    if tried:
        log(f"[plan] {spec_name}: trying fsdp sizes {tried}")
    spec = run.stage(spec_name)
    for size in tried:
        mesh = parallel.make_mesh(chips // size, fsdp=size, devices=devices)
        program = programs_lib.train_program(run, spec, mesh)
        if program.lowered is None:
            continue
        again = _compile(program, chip, chips, log)
        if again.fits:
            return (
                f"fits with --mesh={chips // size}x{size}: "
                f"{estimate_lib.human_bytes(again.total_bytes)} per chip"
            )
    sizes = ", ".join(str(s) for s in tried) or "none that divides the chips"
    return _advise_savers(run, result, spec_name, devices, fsdp, chip, log) or (
        f"does not fit with fsdp sizes tried ({sizes}) nor with more microbatches or "
        "rematerialisation; use a larger slice or a smaller batch"
    )


def _saver_settings(result, devices, config) -> list[tuple[int, str, str]]:
    """(microbatches, remat, attention) to try, cheapest first.

    On a TPU the splash kernel first (it never holds the attention logits, at no compute
    cost), then with each (microbatches, remat) of `estimate.saver_candidates`.
    """
    attention = str(config.model.attention)
    if devices[0].platform == "tpu":
        attention = "splash"
    candidates = estimate_lib.saver_candidates(
        result,
        batch=result.batch,
        chips=len(devices),
        microbatches=int(config.train.microbatches),
        remat=str(config.model.remat),
    )
    settings = [(m, r, attention) for m, r in candidates]
    if attention != config.model.attention:
        settings.insert(0, (int(config.train.microbatches), str(config.model.remat), attention))
    return settings[:MAX_SAVER_TRIES]


def _advise_savers(run, result, spec_name, devices, fsdp, chip, log) -> str:
    """The cheapest memory savers (`_saver_settings`) with which the step fits."""
    chips, config = len(devices), run.config
    mesh = parallel.make_mesh(chips // fsdp, fsdp=fsdp, devices=devices)
    for microbatches, remat, attention in _saver_settings(result, devices, config):
        changed = ml_collections.ConfigDict(config.to_dict())
        changed.train.microbatches, changed.model.remat = microbatches, remat
        changed.model.attention = attention
        try:
            other = Run.describe(changed)
        except ValueError:  # another stage's batch that these microbatches do not divide
            continue
        log(
            f"[plan] {spec_name}: trying {microbatches} microbatches, remat {remat!r}, "
            f"attention {attention!r}"
        )
        program = programs_lib.train_program(other, other.stage(spec_name), mesh)
        if program.lowered is None:
            continue
        again = _compile(program, chip, chips, log)
        if again.fits:
            flags = [
                f"--config.{key}={value}"
                for key, value, old in (
                    ("model.attention", attention, config.model.attention),
                    ("train.microbatches", microbatches, config.train.microbatches),
                    ("model.remat", remat, config.model.remat),
                )
                if value != old
            ]
            fits = estimate_lib.human_bytes(again.total_bytes)
            return f"fits with {' '.join(flags)}: {fits} per chip"
    return ""


def _estimates(run, programs, devices, fsdp, chip, log, *, advise: bool) -> list:
    done: dict[str, estimate_lib.Estimate] = {}
    results = []
    for program in programs:
        chips = len(devices) if program.kind == "train" else 1
        if program.problem:
            result = estimate_lib.unrunnable(program, chip)
        elif program.same_as:
            earlier = done[program.same_as]
            result = dataclasses.replace(
                earlier,
                name=program.name,
                calls=program.calls,
                stage_seconds=earlier.seconds * program.calls,
                compile_seconds=0.0,
                same_as=program.same_as,
            )
        else:
            result = _compile(program, chip, chips, log)
            if advise and program.kind == "train" and not result.fits:
                log(
                    f"{program.name}: needs {result.total_bytes / 2**30:.2f} GiB per chip, "
                    f"the chip has {result.hbm_bytes / 2**30:.2f} GiB: looking for what fits"
                )
                result.advice = _advise(run, result, program.name, devices, fsdp, chip, log)
        done[program.name] = result
        results.append(result)
    return results


def _selected_programs(run, device_mesh, device, sample_batch: int, stages: tuple) -> list:
    """The train steps (on `device_mesh`) and samplers (on one `device`) `stages` selects."""
    programs = programs_lib.train_programs(run, device_mesh, stages)
    programs += programs_lib.sampler_programs(run, device, sample_batch, stages)
    if not programs:
        raise ValueError(
            f"--stages={','.join(stages)} selects none of this run's programs: accepted "
            f"prefixes of {', '.join(s.name for s in run.stages)} or 'sample'."
        )
    return programs


def plan_run(
    config: ml_collections.ConfigDict,
    topology_name: str,
    *,
    mesh: str | None = None,
    sample_batch: int = 64,
    stages: tuple[str, ...] = (),
    advise: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Plan `config`'s run on the slice `topology_name`; the plan as a JSON-able dict.

    Args:
      config: the run's config (its stages, batch sizes, step counts and mesh).
      topology_name: a gcloud accelerator type ('v5e-8', 'v4-32') or 'cpu' (this machine,
        with a measured 'chip').
      mesh: 'DATAxFSDP' replacing config.train's mesh sizes.
      sample_batch: images per sampler call on one chip.
      stages: plan only the programs whose names start with one of these ('teacher',
        'stage2', 'sample'); empty: every program.
      advise: compile a stage that does not fit again at larger 'fsdp' sizes, then with
        microbatches and rematerialisation (`_advise`).
      log: where progress lines go.

    Raises:
      ValueError: an unknown slice, a mesh that does not divide it, a config that does not
        build, or libtpu missing.
    """
    start = time.perf_counter()
    target = topologies.topology(topology_name)
    data, fsdp = parse_mesh(mesh, config, target.chips)
    if sample_batch < 1:
        raise ValueError(f"--sample_batch={sample_batch} is invalid: accepted an integer >= 1.")
    run = Run.describe(config)
    devices = topologies.abstract_devices(target)
    chip = target.chip or measured_cpu_chip()
    device_mesh = parallel.make_mesh(data, fsdp=fsdp, devices=devices)
    programs = _selected_programs(run, device_mesh, devices[0], sample_batch, tuple(stages))
    results = _estimates(run, programs, devices, fsdp, chip, log, advise=advise)
    train = [r for r in results if r.kind == "train"]
    distill = [r for r in train if r.name.startswith(("stage1", "stage2"))]
    return {
        "topology": target.name,
        "libtpu_topology": target.libtpu_name,
        "chips": target.chips,
        "mesh": {"data": data, "fsdp": fsdp},
        "chip": dataclasses.asdict(chip),
        "sample_batch_per_chip": sample_batch,
        "programs": [dict(dataclasses.asdict(r), fits=r.fits) for r in results],
        "distillation_seconds": sum(r.stage_seconds for r in distill),
        "total_train_seconds": sum(r.stage_seconds for r in train),
        "all_fit": all(r.fits for r in results),
        "planned_on": f"{platform.node()} ({os.cpu_count()} CPU cores), jax {jax.__version__}",
        "planning_seconds": time.perf_counter() - start,
    }


def _json_safe(tree):
    """`tree` with every non-finite number (a figure not measured: NaN) as None (JSON null)."""
    if isinstance(tree, dict):
        return {key: _json_safe(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_json_safe(value) for value in tree]
    if isinstance(tree, numbers.Real) and not isinstance(tree, numbers.Integral):
        return float(tree) if math.isfinite(tree) else None
    return tree


def write_plan(plan: dict, path: str) -> str:
    """Write the plan as JSON to `path` (atomically; figures not measured are null)."""
    with files.atomic_path(path) as tmp, tmp.open("w") as handle:
        json.dump(_json_safe(plan), handle, indent=2, default=float, allow_nan=False)
    return path
