"""Training metrics output: a JSONL file and TensorBoard event files in the workdir, and progress.

Only process 0 writes. Each JSONL record is {"stage", "step", <metric>: value, ...}; TensorBoard
events go to workdir/logs/<stage>/. On a terminal a tqdm bar shows progress; otherwise an absl
log line is written every log interval. (clu's writers would import TensorFlow, which this
project avoids, hence tensorboardX.)
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import tqdm
from absl import logging
from etils import epath

from distill_jax import files


class MetricsWriter:
    """Writes scalar metrics of one stage; a no-op on processes other than 0."""

    def __init__(
        self,
        metrics_file: epath.PathLike,
        logs_dir: epath.PathLike,
        stage: str,
        *,
        total_steps: int,
        start_step: int,
    ):
        self.stage = stage
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._bar = None
        if not self.enabled:
            return
        metrics_file = epath.Path(metrics_file)
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = metrics_file.open("a")
        # Imported here: tensorboardX imports torch when it is installed (the bench extra),
        # which would add a second to every command's start-up, sampling included.
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(epath.Path(logs_dir) / stage))
        if sys.stderr.isatty():
            self._bar = tqdm.tqdm(
                total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True
            )

    def rates(self, step: int, batch_size: int) -> dict[str, float]:
        """steps/s, images/s and ETA (s) since the previous call."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_s = (step - self._last_step) / elapsed
        self._last_time, self._last_step = now, step
        remaining = self.total_steps - step
        eta = remaining / steps_per_s if steps_per_s > 0 else math.inf
        return {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * batch_size, "eta_s": eta}

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalars at `step` in JSONL and TensorBoard and update the progress display."""
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": int(step)}
        record.update({k: float(v) for k, v in metrics.items()})
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            for key, value in metrics.items():
                self._tb.add_scalar(key, float(value), int(step))
            self._tb.flush()
        except OSError as error:
            raise OSError(
                f"writing the metrics of {self.stage} step {step} to {self._jsonl.name} failed "
                f"({error.strerror or error}); training stopped: fix the cause (e.g. free disk "
                "space) and rerun the same command to resume from the last checkpoint."
            ) from error
        shown = {k: f"{float(v):.4g}" for k, v in metrics.items() if k in ("loss", "grad_norm")}
        if self._bar is not None:
            self._bar.n = int(step)
            self._bar.set_postfix(shown, refresh=True)
        else:
            eta = metrics.get("eta_s", math.nan)
            extras = " ".join(f"{k}={v}" for k, v in shown.items())
            logging.info(
                "[%s] step %d/%d %s %.2f steps/s eta %.0fs",
                self.stage,
                step,
                self.total_steps,
                extras,
                metrics.get("steps_per_s", 0.0),
                eta,
            )

    def close(self) -> None:
        """Flush and close the files."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        try:
            self._jsonl.close()
            self._tb.close()
        except OSError as error:  # on the way out after a failure: never hide that one
            logging.warning("closing the metrics files: %s", error)


def drop_rows_after(metrics_file: epath.PathLike, stage: str, step: int) -> None:
    """Remove `stage`'s rows with a step beyond `step` (process 0): a resumed stage repeats them.

    Rows of other stages and lines that do not parse are kept; the file is rewritten
    atomically, and only when something is dropped.
    """
    path = epath.Path(metrics_file)
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not _beyond(line, stage, step)]
    if len(kept) != len(lines):
        files.atomic_write(path, "".join(line + "\n" for line in kept))


def _beyond(line: str, stage: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return record.get("stage") == stage and int(record.get("step", 0)) > step
