"""What a compiled program costs one chip: memory, FLOPs, bytes, and a roofline time.

`estimate(program, compiled, chip, chips)` reads XLA's memory analysis (per device: arguments,
outputs, temporaries, and the part of the outputs that reuses donated arguments) and cost
analysis (FLOPs and bytes accessed of one device's program) and turns them into a roofline time
per call: max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth). That is a lower bound: it
ignores the collectives between chips, the host and data loading, and kernels that reach
neither peak; `docs/pod_planning.md` compares it with measured figures.
"""

from __future__ import annotations

import dataclasses
import math
import re

from distill_jax.planning.programs import Program
from distill_jax.topologies import ChipSpec


@dataclasses.dataclass
class Estimate:
    """One program's figures per chip (bytes, FLOPs, seconds).

    Attributes:
      name, kind, batch, calls: as in `Program`.
      argument_bytes, output_bytes, temp_bytes: XLA's memory analysis of one device.
      alias_bytes: output bytes that reuse donated argument buffers (the train state).
      total_bytes: arguments + outputs - aliased + temporaries + generated code: the peak
        the chip must hold.
      hbm_bytes: the chip's HBM.
      flops, bytes_accessed: per call (a sampler's loop body times its trips).
      seconds: roofline time per call; bound: 'compute' or 'memory', whichever sets it.
      images_per_s: images per second per chip at that time.
      stage_seconds: seconds for every call of the stage (train: its steps).
      compile_seconds: how long the compilation took here.
      problem: why it cannot run as asked ('' when it can); fits: total_bytes <= hbm_bytes.
      advice: what to change when it does not fit (a mesh), or ''.
    """

    name: str
    kind: str
    batch: int
    calls: int
    argument_bytes: float = math.nan
    output_bytes: float = math.nan
    alias_bytes: float = math.nan
    temp_bytes: float = math.nan
    total_bytes: float = math.nan
    hbm_bytes: float = math.nan
    flops: float = math.nan
    bytes_accessed: float = math.nan
    seconds: float = math.nan
    bound: str = ""
    images_per_s: float = math.nan
    stage_seconds: float = math.nan
    compile_seconds: float = math.nan
    problem: str = ""
    advice: str = ""
    same_as: str = ""

    @property
    def fits(self) -> bool:
        """Whether the program runs on the chip: no problem and its memory within HBM."""
        return not self.problem and self.total_bytes <= self.hbm_bytes


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost) or {}


def estimate(
    program: Program, compiled, chip: ChipSpec, chips: int, compile_seconds: float
) -> Estimate:
    """The figures of `program` compiled (as `compiled`) for `chips` chips of kind `chip`.

    For a train step the batch is split over `chips`; a sampler program is one chip's.
    """
    memory = compiled.memory_analysis()
    cost = _cost(compiled)
    trips = program.loop_trips
    flops = float(cost.get("flops", 0.0)) * trips
    bytes_accessed = float(cost.get("bytes accessed", 0.0)) * trips
    compute_s, memory_s = flops / chip.peak_flops, bytes_accessed / chip.hbm_bytes_per_s
    seconds = max(compute_s, memory_s)
    per_chip = program.batch / chips if program.kind == "train" else program.batch
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    return Estimate(
        name=program.name,
        kind=program.kind,
        batch=program.batch,
        calls=program.calls,
        argument_bytes=float(memory.argument_size_in_bytes),
        output_bytes=float(memory.output_size_in_bytes),
        alias_bytes=float(memory.alias_size_in_bytes),
        temp_bytes=float(memory.temp_size_in_bytes),
        total_bytes=float(total),
        hbm_bytes=float(chip.hbm_bytes),
        flops=flops,
        bytes_accessed=bytes_accessed,
        seconds=seconds,
        bound="compute" if compute_s >= memory_s else "memory",
        images_per_s=per_chip / seconds if seconds > 0 else math.nan,
        stage_seconds=seconds * program.calls,
        compile_seconds=compile_seconds,
        same_as=program.same_as,
    )


_OUT_OF_MEMORY = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT]?)\)")


def out_of_memory(program: Program, chip: ChipSpec, message: str) -> Estimate | None:
    """The figures of a program the TPU compiler refused for want of HBM (None: another error).

    The compiler stops before any analysis, so only memory is known: the temporaries its
    message names plus the arguments' shards; no FLOPs, no times.
    """
    match = _OUT_OF_MEMORY.search(message)
    if "RESOURCE_EXHAUSTED" not in message or match is None:
        return None
    temp = float(match.group(1)) * 1024 ** "_KMGT".index(match.group(2) or "_")
    result = unrunnable(program, chip)
    result.problem = ""
    result.argument_bytes = program.argument_bytes
    result.temp_bytes = temp
    result.total_bytes = program.argument_bytes + temp
    return result


def unrunnable(program: Program, chip: ChipSpec) -> Estimate:
    """The figures of a program that cannot run as asked (`program.problem` says why)."""
    return Estimate(
        program.name,
        program.kind,
        program.batch,
        program.calls,
        hbm_bytes=float(chip.hbm_bytes),
        problem=program.problem,
    )


def fsdp_candidates(result: Estimate, *, fsdp: int, chips: int, state_bytes: float) -> list[int]:
    """'fsdp' sizes, smallest first, at which the step might fit: a first guess to compile.

    Sharding the train state (params, EMA, moments, the frozen teacher: `state_bytes` per
    chip now) over f instead of `fsdp` chips leaves its other memory (activations, the
    batch) unchanged, so the estimate is total - state * (1 - fsdp / f). Only sizes that divide
    the chips are candidates.
    """
    sizes = [f for f in range(fsdp + 1, chips + 1) if chips % f == 0]
    fitting = [
        f for f in sizes if result.total_bytes - state_bytes * (1 - fsdp / f) <= result.hbm_bytes
    ]
    return fitting


def human_bytes(value: float) -> str:
    """'12.3 GiB' (or 'n/a')."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value / 1024**3:.2f} GiB" if value >= 1024**3 / 10 else f"{value / 1024**2:.1f} MiB"


def human_seconds(value: float) -> str:
    """Seconds as '850 us', '12.3 ms', '4.2 s', '3.1 h' or '2.0 d' (or 'n/a')."""
    if not math.isfinite(value):
        return "n/a"
    for limit, unit, scale in ((1e-3, "us", 1e6), (1, "ms", 1e3), (3600, "s", 1)):
        if value < limit:
            return f"{value * scale:.3g} {unit}"
    return f"{value / 3600:.3g} h" if value < 86400 * 2 else f"{value / 86400:.3g} d"


def saver_candidates(
    result: Estimate, *, batch: int, chips: int, microbatches: int, remat: str
) -> list[tuple[int, str]]:
    """(microbatches, remat policy) to compile for a step that does not fit, cheapest first.

    Microbatches cost no compute: the fewest whose temporaries the free memory allows (they
    shrink about in proportion to the microbatch), and twice that; then recomputation
    ('dots_saveable', then 'full') at the most microbatches the batch allows. Each
    microbatch must still spread over every chip.
    """
    free = result.hbm_bytes - (result.total_bytes - result.temp_bytes)
    if not free > 0 or not result.temp_bytes > 0:
        return []
    counts = []
    need = max(2, math.ceil(result.temp_bytes / free))
    count = microbatches * 2 ** math.ceil(math.log2(need))
    while batch % (count * chips) == 0 and len(counts) < 2:
        counts.append(count)
        count *= 2
    most = counts[-1] if counts else microbatches
    policies = [p for p in ("dots_saveable", "full") if p != remat and remat != "full"]
    return [(m, remat) for m in counts] + [(most, p) for p in policies]
