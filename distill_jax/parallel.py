"""Device mesh, shardings and multi-process start-up.

Training runs on a 2-D mesh ('data', 'fsdp'). The batch is split over all of its devices. With
an 'fsdp' axis of size 1 (config.train.mesh_fsdp_axis = 1, the default) this is pure data
parallelism and the train state is replicated; with a larger 'fsdp' axis each parameter, its EMA
and its optimiser moments are split along their largest divisible axis over 'fsdp' (FSDP/ZeRO-3
style: XLA gathers a parameter where it is used and reduce-scatters its gradient), so a model
too big for one device's memory still trains. `initialize_distributed` starts
`jax.distributed` from flags or environment variables (or JAX's own auto-detection on TPU pods
and SLURM) before any other JAX call, so the mesh spans every process's devices.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# The batch is split over every device of the mesh: both axes.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
PyTree = Any


# How long a process may stay silent before the others count it as dead and exit with an
# error (JAX's default is 100 s), and how long start-up waits for every process to join.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
DEFAULT_INITIALIZATION_TIMEOUT_S = 300


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value else None


def _cluster_settings(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    heartbeat_timeout_s: int | None,
    initialization_timeout_s: int | None,
) -> tuple[dict | None, dict]:
    """(explicit coordinator arguments or None, timeouts) from arguments, else the environment."""
    env = os.environ
    address = coordinator_address or env.get("DISTILL_JAX_COORDINATOR")
    count = _env_int("DISTILL_JAX_NUM_PROCESSES") if num_processes is None else num_processes
    index = _env_int("DISTILL_JAX_PROCESS_ID") if process_id is None else process_id
    heartbeat = heartbeat_timeout_s or _env_int("DISTILL_JAX_HEARTBEAT_TIMEOUT")
    initialization = initialization_timeout_s or _env_int("DISTILL_JAX_INIT_TIMEOUT")
    timeouts = dict(
        heartbeat_timeout_seconds=heartbeat or DEFAULT_HEARTBEAT_TIMEOUT_S,
        initialization_timeout=initialization or DEFAULT_INITIALIZATION_TIMEOUT_S,
    )
    if not address:
        return None, timeouts
    if count is None or index is None:
        raise ValueError(
            "A coordinator address needs num_processes and process_id too "
            f"(got num_processes={count}, process_id={index})."
        )
    return dict(coordinator_address=address, num_processes=count, process_id=index), timeouts


def _auto_detect_cluster() -> bool:
    """Whether to let JAX auto-detect the cluster (DISTILL_JAX_DISTRIBUTED, SLURM, TPU pods)."""
    env = os.environ
    mode = env.get("DISTILL_JAX_DISTRIBUTED", "")
    if mode not in ("", "auto", "off"):
        raise ValueError(
            f"DISTILL_JAX_DISTRIBUTED={mode!r} is invalid: accepted 'auto', 'off' or unset."
        )
    if mode == "off":
        return False
    several_slurm_tasks = int(env.get("SLURM_NTASKS", "1")) > 1
    several_tpu_hosts = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    return mode == "auto" or several_slurm_tasks or several_tpu_hosts


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int | None = None,
    initialization_timeout_s: int | None = None,
) -> bool:
    """Start `jax.distributed` when running several processes; return whether it started.

    Arguments override the environment variables DISTILL_JAX_COORDINATOR,
    DISTILL_JAX_NUM_PROCESSES, DISTILL_JAX_PROCESS_ID, DISTILL_JAX_HEARTBEAT_TIMEOUT and
    DISTILL_JAX_INIT_TIMEOUT (seconds). Without a coordinator, a single process on one host
    runs without it; under SLURM with several tasks, on a TPU pod whose TPU_WORKER_HOSTNAMES
    lists several hosts, or with DISTILL_JAX_DISTRIBUTED=auto (set by launch/tpu_pod.py),
    JAX's own cluster auto-detection supplies them. DISTILL_JAX_DISTRIBUTED=off never starts it.

    Failure behaviour: when a process dies (killed, OOM, lost host), the coordination service
    stops hearing its heartbeat and, after `heartbeat_timeout_s`, every other process is
    terminated with an error instead of waiting forever in a collective; a process that cannot
    reach the others gives up after `initialization_timeout_s`.

    CPU processes exchange collectives over gloo (JAX's default CPU implementation), which is
    what the local multi-process launcher (launch/local.py) and its test use.
    """
    explicit, timeouts = _cluster_settings(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout_s,
        initialization_timeout_s,
    )
    if explicit is not None:
        jax.distributed.initialize(**explicit, **timeouts)
        return True
    if _auto_detect_cluster():
        # JAX's cluster auto-detection: Cloud TPU VM metadata, SLURM, Open MPI, Kubernetes.
        jax.distributed.initialize(**timeouts)
        return True
    return False


def sync_processes(name: str) -> None:
    """Block until every process reaches the barrier `name` (no-op with one process).

    Used after process 0 alone writes a file that the others read next (FINISHED.json), so
    no process reads it before it exists.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# Words in the errors a collective or the coordination service raises when another process of
# the job has gone (killed, crashed, preempted): Gloo on CPU, NCCL on GPU, the service itself.
_LOST_PEER_MARKERS = (
    "Gloo",
    "NCCL",
    "heartbeat",
    "coordination service",
    "Connection reset by peer",
    "Connection closed",
)


class PeerLostError(RuntimeError):
    """Another process of this multi-process job stopped, so this one cannot go on."""


def lost_peer_error(error: BaseException) -> PeerLostError | None:
    """A PeerLostError explaining `error` if it says another process is gone, else None.

    Only in multi-process jobs: looks at the error and its cause for the words a failed
    collective or the coordination service uses.
    """
    if isinstance(error, PeerLostError):
        return error
    if jax.process_count() < 2:
        return None
    for cause in (error, error.__cause__, error.__context__):
        text = str(cause).strip() if cause is not None else ""
        if any(marker in text for marker in _LOST_PEER_MARKERS):
            return PeerLostError(
                f"process {jax.process_index()} of {jax.process_count()} lost contact with "
                f"another process of this job ({type(cause).__name__}: "
                f"{text.splitlines()[0]}). Another process stopped (killed, crashed or "
                "preempted): its log says why. The committed checkpoints are intact: rerun the "
                "same command on every host to resume."
            )
    return None


def make_mesh(num_data_devices: int = -1, *, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A 2-D mesh ('data', 'fsdp') of shape (num_data_devices, fsdp) over the first devices.

    Args:
      num_data_devices: size of the 'data' axis; -1 uses every device (len(devices) // fsdp).
      fsdp: size of the 'fsdp' axis, over which parameters and optimiser state are sharded
        (1: pure data parallelism, everything replicated).
      devices: the devices to use (default jax.devices()); a TPU slice's abstract devices
        (`topologies.abstract_devices`) make a mesh to compile for, not to run on.

    With several processes the mesh must use every device, so that each process feeds its
    own devices; devices keep jax.devices() order (process 0's first), so each process holds
    a contiguous block of the batch.
    """
    devices = jax.devices() if devices is None else list(devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(
            f"mesh_fsdp_axis={fsdp} is invalid with {len(devices)} devices: accepted a "
            f"divisor of {len(devices)}."
        )
    if num_data_devices == -1:
        num_data_devices = len(devices) // fsdp
    if not 1 <= num_data_devices * fsdp <= len(devices):
        raise ValueError(
            f"mesh_data_axis={num_data_devices} (x mesh_fsdp_axis={fsdp}) devices requested, "
            f"but {len(devices)} exist: accepted -1 (all) or a count in "
            f"1..{len(devices) // fsdp}."
        )
    used = num_data_devices * fsdp
    if jax.process_count() > 1 and used != len(devices):
        raise ValueError(
            f"mesh_data_axis={num_data_devices} uses {used} of {len(devices)} devices; with "
            f"{jax.process_count()} processes the mesh must span all of them: accepted -1."
        )
    shape, names = (num_data_devices, fsdp), (DATA_AXIS, FSDP_AXIS)
    axis_types = (AxisType.Auto, AxisType.Auto)  # shardings propagate as with Mesh()
    try:
        return jax.make_mesh(shape, names, devices=devices[:used], axis_types=axis_types)
    except NotImplementedError:
        # A TPU torus whose axes do not factor into this shape (fsdp 2 on v5p's 4x4x4): the
        # mesh splits a physical axis, which XLA supports at some cost in collectives.
        grid = mesh_utils.create_device_mesh(shape, devices[:used], allow_split_physical_axes=True)
        return Mesh(grid, names, axis_types=axis_types)


def traced_in_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced with `mesh` as the abstract mesh, for `jax.jit`.

    Code inside that GSPMD cannot split (the 'splash' attention kernel,
    `distill_jax.attention`) finds the mesh there and splits itself with `jax.shard_map`.
    """

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over every device ('data' and 'fsdp')."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Shard the largest axis of `shape` divisible by `fsdp` over 'fsdp' (none: replicate)."""
    if fsdp == 1:
        return PartitionSpec()
    candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    _, neg_axis = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_axis] = FSDP_AXIS
    return PartitionSpec(*spec)


def param_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    """FSDP-style shardings for a params-like pytree (params, EMA, optimiser state, teacher).

    Each leaf is split along its largest axis divisible by the mesh's 'fsdp' size and
    replicated over 'data'; leaves without such an axis (scalars, odd sizes) are replicated.
    With an 'fsdp' axis of size 1 everything is replicated (pure data parallelism).
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp)), tree)


def host_to_global(tree: PyTree, shardings: PyTree) -> PyTree:
    """Turn a host-local pytree, identical on every process, into global arrays.

    Leaves may be numpy arrays or single-device jax.Arrays (e.g. the round number N, or a
    Gaussian mixture); each process fills in the shards of its own devices from its copy.
    This is how such values enter a multi-process jit: a process-local array cannot be passed
    to a computation that spans other processes' devices. A leaf that already is a global
    array with the wanted sharding (a teacher restored straight into its shardings) is kept as
    it is: fetching it to the host would need every shard on every process.
    """

    def put(leaf, sharding):
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf
        value = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, shardings)


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache; return its directory (None when off).

    Stage-two rounds of equal length compile to the same program, and reruns of a config
    (or a second identical `sample` command) recompile nothing, so on CPU this saves much of a
    short run's time. Every program is stored, however quick its compilation. The directory is
    `directory`, else $DISTILL_JAX_COMPILATION_CACHE ('off' disables it), else
    ~/.cache/distill_jax/xla.
    """
    directory = directory or os.environ.get("DISTILL_JAX_COMPILATION_CACHE", "")
    if directory == "off":
        return None
    directory = directory or os.path.join(os.path.expanduser("~"), ".cache", "distill_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    # JAX stores only programs that took a second or more to compile; on a CPU a sampler or a
    # small step compiles faster than that, yet a command's start-up is a few of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
