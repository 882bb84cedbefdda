"""The run layer: the one owner of a run's workdir, its stages and their weights.

`Run` (run.py) is what callers use; `stages` holds the registry of stage kinds and the plan of a
config's stages; `workdir` the layout and the recorded config.
"""

from distill_jax.run.latents import Latents
from distill_jax.run.run import Run
from distill_jax.run.stages import KINDS, StageKind, StageSpec, plan_stages, round_name
from distill_jax.run.workdir import ConfigMismatchError, WorkdirBusyError, config_differences

__all__ = [
    "KINDS",
    "ConfigMismatchError",
    "Latents",
    "Run",
    "StageKind",
    "StageSpec",
    "WorkdirBusyError",
    "config_differences",
    "plan_stages",
    "round_name",
]
