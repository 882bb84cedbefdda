"""Orbax checkpointing of a stage: periodic async saves, resume, and a stage's final weights.

Each stage (teacher, stage1, stage2/steps_XXXX) owns one directory managed by one
`ocp.CheckpointManager`, whose options carry the policy: a save every `save_every` steps
(`FixedIntervalPolicy`) and the `keep` most recent kept (`max_to_keep`); the training loop
adds a save at a preemption sync point. A checkpoint holds two items: 'state' (the TrainState
pytree) and, when the stage reads data through grain, 'data' (the grain iterator's position,
so a resumed run continues the same data order). When a stage has reached its last step and
that save has been committed, `mark_finished` writes FINISHED.json beside the step folders; a
later run skips such a stage, and any reader loads its final weights with `restore_params`,
which reads only the requested subtree of 'state' through the same kind of manager.

Resume order (documented because getting it wrong silently changes results): build the abstract
state with jax.eval_shape, restore 'state' into it with the target shardings, then restore
'data' into a freshly built iterator, then continue from state.step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from distill_jax import files, parallel, trees

FINISHED_FILE = "FINISHED.json"
PyTree = Any


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, permissions, a vanished directory)."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else repr(error)


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
        # The interval only: preemption is asked once per step by the training loop
        # (`reached_preemption`), since JAX's sync point answers True for one query only.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
            # A save cut short (a full disk, a kill) leaves STEP.orbax-checkpoint-tmp behind;
            # Orbax removes it when the stage resumes (the workdir lock rules out a live writer).
            cleanup_tmp_directories=True,
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
        """Save (asynchronously) the state and the data iterator position at `step`.

        Raises CheckpointSaveError at once when the save cannot start, or when an earlier
        background save has failed.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.check_for_errors(step)
        try:
            return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:  # noqa: BLE001 - Orbax wraps OS errors in its own
            raise self._save_error(step, error) from error

    def wait(self, step: int) -> None:
        """Block until pending saves are committed; CheckpointSaveError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._save_error(step, error) from error
        self.check_for_errors(step)

    def restore(self, abstract_state: PyTree, data_iterator: Any = None) -> tuple[int, PyTree]:
        """(step, state) of the newest kept checkpoint that restores, and its data position.

        The state comes back in `abstract_state`'s shapes and shardings. When the newest step
        cannot be read (a damaged or truncated file), a warning names it and the next older
        kept step is tried; once one restores, the damaged newer ones are moved aside to
        `damaged.STEP` (kept for inspection, ignored by Orbax) so training can save those steps
        again. When none restores, nothing is moved and ValueError says why.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
        errors = []
        for step in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as error:  # noqa: BLE001 - damaged files fail in many layers
                errors.append((step, error))
                logging.warning(
                    "checkpoint %s/%d cannot be restored (%s: %s); trying the previous one.",
                    self.directory,
                    step,
                    type(error).__name__,
                    _first_line(error),
                )
                continue
            self._set_aside([s for s, _ in errors])
            return step, restored["state"]
        first_step, first_error = errors[0]
        raise ValueError(
            f"No kept checkpoint of {self.directory} (steps {steps}) can be restored into this "
            f"config's train state; step {first_step}: {type(first_error).__name__}: "
            f"{_first_line(first_error)}. If the optimiser or model settings changed since they "
            "were saved, rerun with the recorded config (config.json); if the files are "
            "damaged, delete the stage directory to train the stage again."
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged step folders to damaged.STEP (process 0) and forget them."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                (self.directory / str(step)).rename(self.directory / f"damaged.{step}")
        parallel.sync_processes(f"set_aside:{self.directory}")
        self._manager.reload()

    def check_for_errors(self, step: int) -> None:
        """Raise CheckpointSaveError if a background save has failed (checked every interval)."""
        try:
            self._manager.check_for_errors()
        except Exception as error:  # noqa: BLE001 - Orbax re-raises the writer's error
            raise self._save_error(step, error) from error

    def _save_error(self, step: int, error: BaseException) -> Exception:
        """CheckpointSaveError, or PeerLostError when the save failed because a process died."""
        lost = parallel.lost_peer_error(error)
        if lost is not None:
            return lost
        kept = sorted(self._manager.all_steps())
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} to {self.directory} failed "
            f"({type(error).__name__}: {_first_line(error)}); the kept checkpoints (steps "
            f"{kept}) are intact: fix the cause (e.g. free disk space) and rerun the same "
            "command to resume."
        )

    def reached_preemption(self, step: int) -> bool:
        """Whether every process has reached the preemption sync point at `step`.

        Multi-process jobs: JAX's preemption service turns a SIGTERM on any host into one
        agreed step; ask once per step, on every process. Single-process runs return False
        here (see `training.loop`).
        """
        return self._manager.reached_preemption(step)

    def mark_finished(self, step: int, info: dict | None = None) -> None:
        """Wait for pending saves, then record that the stage completed at `step`.

        Refused (CheckpointSaveError) unless the checkpoint of `step` itself is committed,
        so a finished stage always has its final weights.
        """
        self.wait(step)
        if self._manager.latest_step() != step:
            raise CheckpointSaveError(
                f"{self.directory} has no committed checkpoint of its final step {step} "
                f"(latest: {self._manager.latest_step()}); the stage is not marked finished."
            )
        if jax.process_index() == 0:
            payload = {"final_step": int(step), **(info or {})}
            files.atomic_write(self.directory / FINISHED_FILE, json.dumps(payload, indent=2))
        # The other processes may read FINISHED.json next (e.g. to start stage two): none
        # goes on before process 0 has written it.
        parallel.sync_processes(f"finished:{self.directory}")

    def close(self) -> None:
        """Finish pending saves and release the manager.

        Called on the way out, also after a failure: a save error surfacing here is logged
        rather than raised, so it never hides the error that stopped the run (`wait` and
        `mark_finished` raise it on the normal path).
        """
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        except Exception as error:  # noqa: BLE001
            logging.warning("closing %s: %s", self.directory, _first_line(error))


def stage_finished(directory: epath.PathLike) -> dict | None:
    """The FINISHED.json record of a completed stage, or None if it has not finished."""
    path = epath.Path(directory) / FINISHED_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        record = error
    if not isinstance(record, dict) or "final_step" not in record:
        raise ValueError(
            f"{path} is damaged ({record}); delete it to let the stage resume from its latest "
            "checkpoint, or restore it."
        )
    return record


def _with_sharding(abstract: PyTree) -> PyTree:
    """Leaves without a sharding go to the first local device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(spec):
        sharding = getattr(spec, "sharding", None) or device
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)

    return jax.tree.map(leaf, abstract)


def _read(read: Callable[[], Any], what: str, directory: epath.Path, step: int) -> Any:
    """read(), with any failure of a damaged file (metadata or arrays) as one ValueError."""
    try:
        return read()
    except Exception as error:  # noqa: BLE001 - damaged files fail in many layers
        raise ValueError(
            f"The {what} in {directory} (step {step}) cannot be read "
            f"({type(error).__name__}: {_first_line(error)}): its files are damaged; "
            "restore them from a copy, or delete the stage directory and train it again."
        ) from error


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
        # "data" (the grain iterator) is registered only so Orbax does not warn that it exists.
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory} holds no checkpoint.")
        metadata = _read(lambda: manager.item_metadata(step), what, directory, step)
        saved = metadata["state"].tree.get(which)
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
        restored = _read(
            lambda: manager.restore(step, args=ocp.args.Composite(state=state)),
            what,
            directory,
            step,
        )
    finally:
        manager.close()
    return restored["state"][which]
