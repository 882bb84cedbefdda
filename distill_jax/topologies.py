"""TPU slices as gcloud names them, their chips' data-sheet figures, and their abstract devices.

`topology(name)` turns a slice name a user rents ('v5e-8', 'v4-32', 'v5p-128', also
'v5litepod-8') into a `Topology`; `abstract_devices(topology)` asks libtpu for that slice's
devices without any TPU attached (`jax.experimental.topologies.get_topology_desc`), so a jitted
function lowered with shardings over them compiles for that slice on a CPU machine
(`distill_jax.planning`). 'cpu' names this machine's own CPU devices.

gcloud counts TensorCores in v4 and v5p names (v4-32 is 16 chips, each one megacore device) and
chips in v5e names (v5e-8 is 8 chips). The slice shapes and wrap-arounds are those of the
Cloud TPU documentation (and maxtext's accelerator_to_spec_map.py).
"""

from __future__ import annotations

import dataclasses
import os

import jax

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One chip's data-sheet figures: the roofline's peaks.

    Attributes:
      name: the generation ('v5e').
      peak_flops: dense bfloat16 FLOP/s.
      hbm_bytes: HBM capacity in bytes.
      hbm_bytes_per_s: HBM bandwidth in bytes/s.
      source: where the numbers are published.
    """

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bytes_per_s: float
    source: str


CHIPS = {
    "v4": ChipSpec(
        "v4",
        275e12,
        32 * GiB,
        1200e9,
        "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, HBM2 32 GiB, 1200 GBps per chip)",
    ),
    "v5e": ChipSpec(
        "v5e",
        197e12,
        16 * GiB,
        819e9,
        "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, HBM2 16 GB, 819 GBps per chip)",
    ),
    "v5p": ChipSpec(
        "v5p",
        459e12,
        95 * 1e9,
        2765e9,
        "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, HBM2e 95 GB, 2765 GBps per chip)",
    ),
}

# chips -> libtpu slice shape, for the 3-D (v4, v5p) and 2-D (v5e) generations.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8"}  # fmt: skip
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}  # fmt: skip
_WRAP_2D = {128: (False, True, False), 256: (True, True, False)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (or this machine's CPU).

    Attributes:
      name: the gcloud accelerator type ('v5e-8'), or 'cpu'.
      chip: its chips' `ChipSpec` (None for 'cpu': the caller measures the machine).
      chips: how many chips (= JAX devices: v4 and v5p run one megacore device per chip).
      libtpu_name: the slice as libtpu names it ('v5e:2x4').
      options: the other get_topology_desc arguments (chip config, host bounds, wrap-around).
    """

    name: str
    chip: ChipSpec | None
    chips: int
    libtpu_name: str = ""
    options: tuple = ()


def _catalogue() -> dict[str, Topology]:
    """Every slice of 4 to 256 chips (v5e from 1) of the generations in CHIPS."""
    slices = {}
    for generation, prefix in (("v4", "v4"), ("v5p", "v5")):
        for chips, shape in _SHAPES_3D.items():
            options = (
                ("chip_config_name", "megacore"),
                ("chips_per_host_bounds", (2, 2, 1)),
                ("wrap", (chips >= 64,) * 3),
            )
            name = f"{generation}-{2 * chips}"
            slices[name] = Topology(name, CHIPS[generation], chips, f"{prefix}:{shape}", options)
    for chips, shape in _SHAPES_2D.items():
        options = (
            ("chips_per_host_bounds", (2, 2, 1) if chips > 1 else (1, 1, 1)),
            ("wrap", _WRAP_2D.get(chips, (False, False, False))),
        )
        name = f"v5e-{chips}"
        slices[name] = Topology(name, CHIPS["v5e"], chips, f"v5e:{shape}", options)
    return slices


TOPOLOGIES = _catalogue()
CPU = "cpu"


def topology(name: str) -> Topology:
    """The slice called `name` (gcloud's accelerator type; 'v5litepod-N' = 'v5e-N'), or 'cpu'.

    Raises ValueError naming every accepted name when `name` is none of them.
    """
    if name == CPU:
        return Topology(CPU, None, len(jax.devices("cpu")))
    key = name.replace("v5litepod-", "v5e-")
    if key not in TOPOLOGIES:
        raise ValueError(
            f"--topology={name!r} is unknown: accepted {', '.join(TOPOLOGIES)} (gcloud "
            f"accelerator types; v5litepod-N = v5e-N) or {CPU!r}."
        )
    return TOPOLOGIES[key]


def _quiet_libtpu(target: Topology) -> None:
    """Tell libtpu what it would otherwise look up in a TPU VM's metadata (and print about).

    Only defaults: nothing a TPU VM or the user set is replaced. The values describe the
    target slice; the plan never starts a TPU runtime, it only describes one.
    """
    accelerator = target.name.replace("v5e-", "v5litepod-")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu's lockfile guards a TPU's single owner; describing a slice opens no TPU, so
    # neither take it nor wait for it (another JAX process may hold it).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def describable(names=None) -> list[str]:
    """The slices (of `names`, default all) that the installed libtpu can describe."""
    from jax.experimental import topologies as jax_topologies

    found = []
    for name in names or TOPOLOGIES:
        target = TOPOLOGIES[name]
        try:
            jax_topologies.get_topology_desc(target.libtpu_name, "tpu", **dict(target.options))
        except Exception:  # noqa: BLE001 - libtpu raises XlaRuntimeError and others
            continue
        found.append(name)
    return found


def abstract_devices(target: Topology) -> list:
    """The slice's devices as libtpu describes them (no TPU needed); 'cpu': this machine's.

    Raises ValueError when libtpu is not installed or cannot describe the slice (listing the
    slices it can).
    """
    if target.chip is None:
        return jax.devices("cpu")
    from jax.experimental import topologies as jax_topologies

    _quiet_libtpu(target)
    try:
        description = jax_topologies.get_topology_desc(
            target.libtpu_name, "tpu", **dict(target.options)
        )
    except Exception as error:  # noqa: BLE001 - a missing plugin or an unknown slice
        if "libtpu" in str(error).lower() or "plugin" in str(error).lower():
            raise ValueError(
                f"--topology={target.name} needs libtpu to describe TPU slices: pip install "
                "-e .[test] (it pins the libtpu matching jax)."
            ) from None
        can = describable() or ["none"]
        raise ValueError(
            f"--topology={target.name}: the installed libtpu cannot describe {target.libtpu_name}"
            f" ({' '.join(str(error).split())[:200]}); it can describe: {', '.join(can)}."
        ) from None
    devices = list(description.devices)
    if len(devices) != target.chips:
        raise ValueError(
            f"--topology={target.name}: libtpu describes {len(devices)} devices, expected "
            f"{target.chips} (one per chip)."
        )
    return devices
