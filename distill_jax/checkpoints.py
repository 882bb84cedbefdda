"""Orbax checkpointing of a stage: periodic async saves, resume, and a stage's final weights.

Each stage (teacher, stage1, stage2/steps_XXXX) owns one directory managed by one
`ocp.CheckpointManager`, whose options carry the policy: a save every `save_every` steps
(`FixedIntervalPolicy`, plus Orbax's preemption policy) and the `keep` most recent kept
(`max_to_keep`). A checkpoint holds two items: 'state' (the TrainState pytree) and, when the
stage reads data through grain, 'data' (the grain iterator's position, so a resumed run
continues the same data order). When a stage has reached its last step and that save has been
committed, `mark_finished` writes FINISHED.json beside the step folders; a later run skips such a
stage, and any reader loads its final weights with `restore_params`, which reads only the
requested subtree of 'state' through the same kind of manager.

Resume order (documented because getting it wrong silently changes results): build the abstract
state with jax.eval_shape, restore 'state' into it with the target shardings, then restore
'data' into a freshly built iterator, then continue from state.step.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from distill_jax import files, parallel, trees

FINISHED_FILE = "FINISHED.json"
PyTree = Any


class StageCheckpointer:
    """One stage's Orbax CheckpointManager with the save/retention policy of the config.

    Args:
      directory: the stage directory (created if missing).
      keep: how many most recent checkpoints to keep.
      save_every: save when step % save_every == 0 (`save(..., force=True)` saves any step).
      enable_async: write in a background thread while training continues.
    """

    def __init__(
        self,
        directory: epath.PathLike,
        *,
        keep: int = 2,
        save_every: int = 500,
        enable_async: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep} is invalid: accepted an integer >= 1.")
        if save_every < 1:
            raise ValueError(f"checkpoint_every={save_every} is invalid: accepted an integer >= 1.")
        self.directory = epath.Path(directory).absolute()
        policy = policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_decision_policy=policy,
            create=True,
            enable_async_checkpointing=enable_async,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest committed step, or None for a fresh stage."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether the save policy saves at `step`."""
        return self._manager.should_save(step)

    def save(self, step: int, state: PyTree, data_iterator: Any = None, *, force: bool = False):
        """Save (asynchronously) the state and the data iterator position at `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: PyTree, data_iterator: Any = None) -> PyTree:
        """Restore the latest state (into `abstract_state`'s shapes and shardings) and iterator."""
        step = self.latest_step()
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
            files.atomic_write(self.directory / FINISHED_FILE, json.dumps(payload, indent=2))
        # The other processes may read FINISHED.json next (e.g. to start stage two): none
        # goes on before process 0 has written it.
        parallel.sync_processes(f"finished:{self.directory}")

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def stage_finished(directory: epath.PathLike) -> dict | None:
    """The FINISHED.json record of a completed stage, or None if it has not finished."""
    path = epath.Path(directory) / FINISHED_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _with_sharding(abstract: PyTree) -> PyTree:
    """Leaves without a sharding go to the first local device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(spec):
        sharding = getattr(spec, "sharding", None) or device
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)

    return jax.tree.map(leaf, abstract)


def restore_params(
    directory: epath.PathLike,
    abstract_params: PyTree,
    *,
    which: str = "ema_params",
    what: str = "checkpoint",
) -> PyTree:
    """Load one params pytree ('ema_params' or 'params') of a stage's latest checkpoint.

    `abstract_params` (from jax.eval_shape of the stage's init, leaves optionally carrying a
    sharding; default the first local device) is the restore target: only that subtree of the
    state is read, so the stage's optimiser need not be rebuilt, and arrays come back already
    placed. `what` names the checkpoint in messages ('teacher checkpoint').

    Raises:
      FileNotFoundError: the directory holds no checkpoint.
      ValueError: the checkpoint's parameter names or shapes differ from the target's (a
        checkpoint of another model), naming the first difference.
    """
    if which not in ("ema_params", "params"):
        raise ValueError(f"which={which!r} is invalid: accepted 'ema_params' or 'params'.")
    directory = epath.Path(directory).absolute()
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory} holds no checkpoint.")
        saved = manager.item_metadata(step)["state"].tree.get(which)
        mismatch = trees.shape_mismatch(saved, abstract_params) if saved else f"no {which}"
        if mismatch:
            raise ValueError(
                f"The {what} in {directory} does not fit this config's model: {mismatch}."
            )
        target = {which: _with_sharding(abstract_params)}
        state = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=state))
    finally:
        manager.close()
    return restored["state"][which]
