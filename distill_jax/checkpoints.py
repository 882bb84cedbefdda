"""Orbax checkpointing of a stage: periodic async saves, resume, and a stage's final weights.

Each stage (teacher, stage1, stage2/steps_XXXX) owns one directory managed by one
`ocp.CheckpointManager`. A checkpoint holds two items: 'state' (the TrainState pytree) and,
when the stage reads data through grain, 'data' (the grain iterator's position, so a resumed run
continues the same data order). When a stage has reached its last step and that save has been
committed, `mark_finished` writes FINISHED.json beside the step folders; a later run skips such a
stage and a later stage restores its final EMA weights with `restore_stage_params`.

Resume order (documented because getting it wrong silently changes results): build the abstract
state with jax.eval_shape, restore 'state' into it with the target shardings, then restore
'data' into a freshly built iterator, then continue from state.step.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from distill_jax import parallel

FINISHED_FILE = "FINISHED.json"
PyTree = Any


class StageCheckpointer:
    """One stage's Orbax CheckpointManager with the save/resume policy of the config.

    Args:
      directory: the stage directory (created if missing).
      keep: how many most recent checkpoints to keep.
      save_every: save when step % save_every == 0 (the final step is always saved).
      enable_async: write in a background thread while training continues.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        keep: int = 2,
        save_every: int = 500,
        enable_async: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep} is invalid: accepted an integer >= 1.")
        if save_every < 1:
            raise ValueError(f"checkpoint_every={save_every} is invalid: accepted an integer >= 1.")
        self.directory = pathlib.Path(directory).absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=enable_async,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest committed step, or None for a fresh stage."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether the periodic policy saves at `step`."""
        return step % self.save_every == 0

    def save(self, step: int, state: PyTree, data_iterator: Any = None) -> None:
        """Save (asynchronously) the state and the data iterator position at `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, abstract_state: PyTree, data_iterator: Any = None, *, step: int | None = None
    ) -> PyTree:
        """Restore the state (into `abstract_state`'s shapes and shardings) and the iterator."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def mark_finished(self, step: int, info: dict | None = None) -> None:
        """Wait for pending saves, then record that the stage completed at `step`."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            payload = {"final_step": int(step), **(info or {})}
            tmp = self.directory / (FINISHED_FILE + ".tmp")
            tmp.write_text(json.dumps(payload, indent=2))
            tmp.replace(self.directory / FINISHED_FILE)
        # The other processes may read FINISHED.json next (e.g. to start stage two): none
        # goes on before process 0 has written it.
        parallel.sync_processes(f"finished:{self.directory}")

    def wait(self) -> None:
        """Block until every pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def stage_finished(directory: str | pathlib.Path) -> dict | None:
    """The FINISHED.json record of a completed stage, or None if it has not finished."""
    path = pathlib.Path(directory) / FINISHED_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def restore_stage_params(
    directory: str | pathlib.Path,
    *,
    which: str = "ema_params",
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> PyTree:
    """Load one params pytree ('ema_params' or 'params') of a stage's latest (or given) step.

    Only that subtree is read, so it does not need the stage's optimiser to be rebuilt. Arrays
    come back with `sharding` (default: the first local device).
    """
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if which not in ("ema_params", "params"):
        raise ValueError(f"which={which!r} is invalid: accepted 'ema_params' or 'params'.")
    directory = pathlib.Path(directory).absolute()
    if step is None:
        steps = sorted(int(p.name) for p in directory.glob("[0-9]*") if p.name.isdigit())
        if not steps:
            raise FileNotFoundError(f"{directory} holds no checkpoint.")
        step = steps[-1]
    path = directory / str(step) / "state"
    if not path.exists():
        raise FileNotFoundError(f"No saved state at {path}.")
    checkpointer = ocp.PyTreeCheckpointer()
    tree_meta = checkpointer.metadata(path).item_metadata.tree
    if which not in tree_meta:
        raise ValueError(f"Checkpoint {path} has no '{which}' subtree.")
    abstract = {
        which: jax.tree.map(
            lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype), tree_meta[which]
        )
    }
    restored = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), abstract),
            partial_restore=True,
        ),
    )
    return restored[which]
