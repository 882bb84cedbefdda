"""Device mesh, shardings and multi-process start-up.

Training is data parallel over a 1-D mesh whose single axis is named 'data': the batch is
split along it and the train state is replicated. `initialize_distributed` starts
`jax.distributed` from flags or environment variables (or JAX's own auto-detection on TPU pods
and SLURM) before any other JAX call, so the mesh spans every process's devices.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start `jax.distributed` when running several processes; return whether it started.

    Arguments override the environment variables DISTILL_JAX_COORDINATOR,
    DISTILL_JAX_NUM_PROCESSES and DISTILL_JAX_PROCESS_ID. With none of them set, a single
    process on one host runs without it; on a TPU pod or under SLURM (several tasks), JAX
    auto-detects the cluster when called with no arguments.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("DISTILL_JAX_COORDINATOR")
    if num_processes is None and env.get("DISTILL_JAX_NUM_PROCESSES"):
        num_processes = int(env["DISTILL_JAX_NUM_PROCESSES"])
    if process_id is None and env.get("DISTILL_JAX_PROCESS_ID"):
        process_id = int(env["DISTILL_JAX_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                "A coordinator address needs num_processes and process_id too "
                f"(got num_processes={num_processes}, process_id={process_id})."
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(","):
        jax.distributed.initialize()
        return True
    return False


def make_mesh(num_data_devices: int = -1) -> Mesh:
    """A 1-D mesh named 'data' over the first `num_data_devices` devices (-1: all)."""
    devices = jax.devices()
    if num_data_devices == -1:
        num_data_devices = len(devices)
    if not 1 <= num_data_devices <= len(devices):
        raise ValueError(
            f"mesh_data_axis={num_data_devices} devices requested, but {len(devices)} exist: "
            f"accepted -1 (all) or a count in 1..{len(devices)}."
        )
    return Mesh(np.asarray(devices[:num_data_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the 'data' axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, *, key: str = "batch_size") -> None:
    """Fail with a clear message unless the global batch splits evenly over the devices."""
    devices = mesh.shape[DATA_AXIS]
    if batch_size % devices or batch_size % jax.process_count():
        raise ValueError(
            f"{key}={batch_size} does not split evenly over {devices} devices and "
            f"{jax.process_count()} processes: accepted a multiple of {devices} "
            f"(and of the process count)."
        )
