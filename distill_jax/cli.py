"""Command line: `distill-jax COMMAND --config=FILE[:variant] --workdir=DIR [--config.key=value]`.

Commands:
  train     train (or resume) the teacher
  distill   stage one, then every stage-two halving round (--only=stage1|stage2,
            --teacher=PATH to take a finished teacher stage directory from elsewhere)
  run       the whole pipeline: every stage, skipping finished ones and resuming the rest

Also runnable as `python -m distill_jax`. This module only parses flags and calls library code.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "distill", "run")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/digits.py:smoke."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, logs).")
_ONLY = flags.DEFINE_enum("only", None, ["stage1", "stage2"], "distill: run one stage only.")
_TEACHER = flags.DEFINE_string(
    "teacher", None, "distill: a finished teacher stage directory (default WORKDIR/teacher)."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir even though its recorded config builds a different model or dataset.",
)


def _usage_error(message: str) -> None:
    raise app.UsageError(f"{message}\nCommands: {', '.join(COMMANDS)}.")


def main(argv: list[str]) -> None:
    """Dispatch the command named by the first positional argument."""
    if len(argv) != 2:
        _usage_error(f"Expected exactly one command, got {argv[1:]!r}.")
    command = argv[1]
    if command not in COMMANDS:
        _usage_error(f"Unknown command {command!r}.")
    if _CONFIG.value is None:
        _usage_error("--config is required, e.g. --config=configs/digits.py.")
    if not _WORKDIR.value:
        _usage_error("--workdir is required.")
    from distill_jax import parallel
    from distill_jax.training import pipeline

    # Orbax and grain log every file operation at INFO; keep the console to our progress lines.
    logging.set_verbosity(logging.WARNING)
    parallel.initialize_distributed()
    kwargs = dict(allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    try:
        if command in ("train", "run"):
            pipeline.train_teacher(_CONFIG.value, _WORKDIR.value, **kwargs)
        if command == "distill":
            pipeline.distill_stages(
                _CONFIG.value,
                _WORKDIR.value,
                only=_ONLY.value,
                teacher_dir=_TEACHER.value,
                **kwargs,
            )
        if command == "run":
            pipeline.distill_stages(_CONFIG.value, _WORKDIR.value, **kwargs)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        # Bad input and non-finite training are the user's to fix: show the message, not a
        # traceback (set DISTILL_JAX_TRACEBACK=1 to see it).
        if os.environ.get("DISTILL_JAX_TRACEBACK"):
            raise
        print(f"distill-jax {command}: error: {error}", file=sys.stderr)
        sys.exit(2)


def run_main() -> None:
    """Console-script entry point."""
    app.run(main, argv=sys.argv)
