"""The workdir of one run: its layout and its recorded config.

Layout (every path under the run's workdir, local or `gs://`, as an `etils.epath.Path`):

  config.json            the config of the run (config.previous.json: the one it replaced)
  autoencoder/           latent runs: the KL autoencoder's checkpoints; FINISHED.json holds the
                         latent scale and shape, latents.npz the encoded train split
  teacher/               the teacher's Orbax checkpoints (FINISHED.json when done)
  imported/              an imported teacher's files a run reads after the import (configs,
                         tokenizer, text encoder), so the workdir does not need the folder
  stage1/                stage one's guidance-conditioned student
  stage2/steps_XXXX/     one Orbax directory per halving round, named by the student's steps
  metrics.jsonl, logs/   training metrics (JSONL, TensorBoard events)
  timings.json           wall time of each phase
  eval/, report.md       the evaluation and its report

Recording rules: a resumed workdir whose recorded config differs in a key that changes the model
or the data is refused unless the caller allows it; `record_config` then keeps the old record
as config.previous.json. Reading a run fills keys the record lacks (added to the schema after
the run was made) with the schema's defaults.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from etils import epath

from distill_jax import config as config_lib
from distill_jax import config_checks, files, trees

CONFIG_FILE = "config.json"
PREVIOUS_CONFIG_FILE = "config.previous.json"
METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"
TIMINGS_FILE = "timings.json"
EVAL_DIR = "eval"
REPORT_FILE = "report.md"
LOCK_FILE = ".lock"
LATENTS_FILE = "latents.npy"  # in the autoencoder's directory: the encoded train split
LABELS_FILE = "latent_labels.npy"  # and its labels
IMPORTED_DIR = "imported"  # an imported pipeline's files a run reads after the import

# Keys whose change makes existing checkpoints meaningless (another network or another data).
MODEL_DEFINING_PREFIXES = (
    "model.",
    "teacher.kind",
    "data.name",
    "data.image_size",
    "data.gmm.",
    "diffusion.logsnr_min",
    "diffusion.logsnr_max",
    "autoencoder.enabled",
    "autoencoder.channel",  # channels and channel_mult
    "autoencoder.num_res_blocks",
    "autoencoder.latent_channels",
)

# Keys under those prefixes that change how a network is computed, not the network.
COMPUTE_ONLY_KEYS = ("model.attention", "model.remat")


class ConfigMismatchError(ValueError):
    """The workdir was made with a config that builds a different model or dataset."""


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock."""


# Locks this process holds: workdir -> [file descriptor, nesting depth].
_HELD: dict[str, list[int]] = {}


def _is_local(workdir: epath.Path) -> bool:
    return "://" not in str(workdir)


@contextlib.contextmanager
def locked(workdir: epath.Path) -> Iterator[None]:
    """Hold the workdir's advisory lock (workdir/.lock, process 0 only) for the body.

    A second process that asks for the lock while it is held fails at once with
    WorkdirBusyError naming the holder. Re-entrant within a process. What it guarantees: on a
    local filesystem, and on NFS (Linux emulates flock with NFS byte-range locks), two
    commands cannot write one workdir at the same time. Object stores and gcsfuse have no
    locks: a `gs://` workdir is not locked, and two jobs on one bucket path must be avoided
    by the user. The lock is released when the body ends or the process dies.
    """
    key = str(workdir)
    if jax.process_index() != 0 or not _is_local(workdir):
        yield
        return
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    workdir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(os.fspath(workdir / LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 512, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise WorkdirBusyError(
            f"{workdir} is in use by another distill-jax process ({holder}); wait for it to "
            "finish or stop it, or use another --workdir."
        ) from None
    os.ftruncate(descriptor, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}".encode(), 0)
    _HELD[key] = [descriptor, 1]
    try:
        yield
    finally:
        del _HELD[key]
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def with_kept_files(config: ml_collections.ConfigDict, workdir: epath.Path):
    """`config` reading an imported pipeline's parts from the workdir's copy, where it has one.

    text.pipeline and autoencoder.pipeline, where set, name workdir/IMPORTED_DIR: the copy the
    import made, wherever the workdir or the original folder is now. A workdir imported
    before copies were made keeps the folder it names.
    """
    kept = workdir / IMPORTED_DIR
    if (config.text.pipeline or config.autoencoder.pipeline) and kept.exists():
        config = ml_collections.ConfigDict(config.to_dict())
        for section in (config.text, config.autoencoder):
            if section.pipeline:
                section.pipeline = str(kept)
    return config


def _dotted(tree: dict) -> dict[str, Any]:
    """{'model.channels': 64, 'model.channel_mult.0': 1, ...} of a JSON config tree."""
    return {name.replace("/", "."): leaf for name, leaf in trees.named_leaves(tree).items()}


def _state_structure(tree: dict) -> dict[str, bool]:
    """What shapes a stage's saved optimiser state: whether gradient clipping is in the chain."""
    return {
        f"{stage}.optimizer.grad_clip > 0": float(
            tree.get(stage, {}).get("optimizer", {}).get("grad_clip", 0) or 0
        )
        > 0
        for stage in ("teacher", "stage1", "stage2")
    }


def config_differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose change makes existing checkpoints unusable: {key: (old, new)}.

    The model- and data-defining keys, and whether each stage clips gradients (a change of
    the optimiser chain, so of the saved train state's structure).
    """
    flat_old = {**_dotted(old), **_state_structure(old)}
    flat_new = {**_dotted(new), **_state_structure(new)}
    return {
        key: (flat_old.get(key), flat_new.get(key))
        for key in sorted(set(flat_old) | set(flat_new))
        if key.startswith((*MODEL_DEFINING_PREFIXES, *_state_structure({})))
        and key not in COMPUTE_ONLY_KEYS
        and flat_old.get(key) != flat_new.get(key)
    }


def _read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); restore it or use a new workdir."
        ) from None


def check_config(
    config: ml_collections.ConfigDict, workdir: epath.Path, *, allow_config_change: bool
) -> None:
    """Validate `config` against itself and workdir/config.json; writes nothing.

    Raises:
      ValueError: an invalid config value (naming the key); ConfigMismatchError for a recorded
        config that builds another model or dataset, unless `allow_config_change`.
    """
    config_checks.validate_config(config)
    path = workdir / CONFIG_FILE
    if not path.exists() or allow_config_change:
        return
    diffs = config_differences(_recorded(path), json.loads(config.to_json()))
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
        raise ConfigMismatchError(
            f"{workdir} was created with a different model/data config ({shown}). Use a new "
            "--workdir, or pass --allow_config_change to resume anyway."
        )


def record_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Write workdir/config.json (process 0), keeping a differing old record as previous."""
    if jax.process_index() != 0:
        return
    new = json.loads(config.to_json())
    path = workdir / CONFIG_FILE
    workdir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = _read_json(path)
        if old == new:
            return
        files.atomic_write(workdir / PREVIOUS_CONFIG_FILE, json.dumps(old, indent=2))
    files.atomic_write(path, json.dumps(new, indent=2))


def _recorded(path: epath.Path) -> dict:
    """The config recorded at `path`, with schema defaults for the keys it lacks.

    A key added to the schema after the run was made counts as its default there.
    """
    return _with_defaults(_read_json(path), json.loads(config_lib.base_config().to_json()))


def _with_defaults(recorded: dict, defaults: dict) -> dict:
    """`recorded` plus the keys it lacks from `defaults` (runs made before a key existed)."""
    merged = dict(recorded)
    for key, value in defaults.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _with_defaults(merged[key], value)
    return merged


def _tuples(tree: Any) -> Any:
    """JSON lists back to tuples (the config schema's sequence fields are tuples)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def read_config(workdir: epath.Path) -> ml_collections.ConfigDict:
    """The recorded config of `workdir`, with schema defaults for keys it lacks."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a run directory (create one with "
            "`distill-jax run --config=... --workdir=...`)."
        )
    return ml_collections.ConfigDict(_tuples(_recorded(path)))
