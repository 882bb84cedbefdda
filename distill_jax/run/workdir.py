"""The workdir of one run: its layout and its recorded config.

Layout (every path under the run's workdir, local or `gs://`, as an `etils.epath.Path`):

  config.json            the config of the run (config.previous.json: the one it replaced)
  teacher/               the teacher's Orbax checkpoints (FINISHED.json when done)
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

import json
from typing import Any

import jax
import ml_collections
from etils import epath

from distill_jax import config as config_lib
from distill_jax import files, trees

CONFIG_FILE = "config.json"
PREVIOUS_CONFIG_FILE = "config.previous.json"
METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"
TIMINGS_FILE = "timings.json"
EVAL_DIR = "eval"
REPORT_FILE = "report.md"

# Keys whose change makes existing checkpoints meaningless (another network or another data).
MODEL_DEFINING_PREFIXES = (
    "model.",
    "teacher.kind",
    "data.name",
    "data.image_size",
    "data.gmm.",
    "diffusion.logsnr_min",
    "diffusion.logsnr_max",
)


class ConfigMismatchError(ValueError):
    """The workdir was made with a config that builds a different model or dataset."""


def _dotted(tree: dict) -> dict[str, Any]:
    """{'model.channels': 64, 'model.channel_mult.0': 1, ...} of a JSON config tree."""
    return {name.replace("/", "."): leaf for name, leaf in trees.named_leaves(tree).items()}


def config_differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Model-defining keys whose values differ: {key: (old, new)}."""
    flat_old, flat_new = _dotted(old), _dotted(new)
    return {
        key: (flat_old.get(key), flat_new.get(key))
        for key in sorted(set(flat_old) | set(flat_new))
        if key.startswith(MODEL_DEFINING_PREFIXES) and flat_old.get(key) != flat_new.get(key)
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
    config_lib.validate_config(config)
    path = workdir / CONFIG_FILE
    if not path.exists() or allow_config_change:
        return
    diffs = config_differences(_read_json(path), json.loads(config.to_json()))
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
    recorded = _with_defaults(_read_json(path), config_lib.base_config().to_dict())
    return ml_collections.ConfigDict(_tuples(recorded))
