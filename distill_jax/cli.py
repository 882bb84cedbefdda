"""Command line: `distill-jax COMMAND --config=FILE[:variant] --workdir=DIR [--config.key=value]`.

Commands: train, distill, run, sample, evaluate, export, plan. Their one-line summaries, and
which flags each takes (grouped, with defaults), live in cli_help.py: `distill-jax --help`,
`distill-jax COMMAND --help`, and docs/cli.md.

Also runnable as `python -m distill_jax`. This module only parses flags and calls library code.
Every failure a user can cause ends in one line on stderr and exit code 2 (--traceback adds the
Python traceback); a training command stopped by SIGTERM saves its current step and exits 143.
"""

from __future__ import annotations

import logging as python_logging
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import distill_jax
from distill_jax import cli_help

COMMANDS = ("train", "distill", "run", "sample", "evaluate", "export", "plan")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(distill_jax.__file__))
# Commands that read the workdir's recorded config and need no --config.
WORKDIR_COMMANDS = ("sample", "evaluate", "export")
# Commands that need no workdir.
NO_WORKDIR_COMMANDS = ("plan",)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/digits.py:smoke."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, logs).")
_ONLY = flags.DEFINE_enum("only", None, ["stage1", "stage2"], "distill: run one stage only.")
_TEACHER = flags.DEFINE_string(
    "teacher",
    None,
    "train, distill, run: diffusers:DIR imports a teacher trained elsewhere (a diffusers DiT "
    "or text-to-image pipeline folder) into WORKDIR/teacher once; distill also takes a "
    "finished teacher stage directory (default WORKDIR/teacher); plan: diffusers:DIR sizes the "
    "folder's network from its JSON files.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir even though its recorded config builds a different model or dataset.",
)
_MODEL = flags.DEFINE_enum("model", "student", ["teacher", "student"], "sample: which model.")
_STEPS = flags.DEFINE_integer("steps", None, "sample, export: sampling steps N.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "sample: guidance weight w.")
_SCHEDULE = flags.DEFINE_string(
    "guidance_schedule",
    "constant",
    "sample, export: how w varies over the steps: constant, interval:LO,HI (w for t in [LO, HI], "
    "0 elsewhere) or ramp:G1,G0 (w times a gain linear in t, G1 at t=1, G0 at t=0).",
)
_STOCHASTIC = flags.DEFINE_bool(
    "stochastic",
    False,
    "sample, export: the student's stochastic sampler (sample: ancestral for the teacher).",
)
_GRID = flags.DEFINE_enum(
    "grid",
    "uniform",
    ["uniform", "teacher"],
    "sample --model=teacher: uniform (t = i/N) or teacher (a teacher imported from diffusers "
    "steps on its own DDIM timesteps, as diffusers' DDIMScheduler would).",
)
_NUM = flags.DEFINE_integer("num", 64, "sample: number of samples (ignored with --init).")
_LABELS = flags.DEFINE_list("labels", None, "sample: class labels, cycled (default 0..K-1).")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", None, "sample (text runs): a prompt; repeat for several, cycled to --num."
)
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "sample (text runs): a text file with one prompt per line."
)
_NEGATIVE_PROMPT = flags.DEFINE_string(
    "negative_prompt",
    None,
    "sample (text runs, --model=teacher): guidance's unconditional prompt instead of the empty "
    "one, as diffusers' negative_prompt.",
)
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_OUT = flags.DEFINE_string(
    "out",
    None,
    "sample: the .npz to write (a .png is written beside); export: the directory; plan: the "
    "JSON file (default plan_TOPOLOGY.json).",
)
_INIT = flags.DEFINE_string("init", None, "sample: .npz of start images (images or x, labels).")
_T_START = flags.DEFINE_float("t_start", 1.0, "sample: image-to-image start time in (0, 1].")
_MASK = flags.DEFINE_string(
    "mask", None, "sample: inpainting mask, left|right|top|bottom|center or an .npz ('mask')."
)
_FRESH = flags.DEFINE_bool("fresh", False, "evaluate: measure every row again.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "export: a fixed batch size (default: any batch size)."
)
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "export: lowering targets.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "export: replace an existing --out that holds an earlier export."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "plan: a TPU slice as gcloud names it (v5e-8, v4-32, v5p-128) or cpu."
)
_MESH = flags.DEFINE_string(
    "mesh", None, "plan: DATAxFSDP mesh sizes (default config.train's), e.g. 8x1 or -1x2."
)
_STAGES = flags.DEFINE_list(
    "stages", [], "plan: only the programs starting with these names (teacher, stage2, sample)."
)
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", 64, "plan: images per sampler call on one chip."
)
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On an error, show the Python traceback too (also DISTILL_JAX_TRACEBACK=1)."
)

# What a user's input or environment can cause: shown as one line, exit code 2.
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)
EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 3  # another process of a multi-process job died; rerun to resume


def _usage_error(message: str) -> None:
    raise ValueError(f"{message} Commands: {', '.join(COMMANDS)}; see --help.")


def _wants_traceback(argv: list[str]) -> bool:
    return "--traceback" in argv or bool(os.environ.get("DISTILL_JAX_TRACEBACK"))


def _error_line(error: BaseException) -> str:
    """The error as one line (multi-line messages are joined)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def _exit_with(prefix: str, error: BaseException, code: int = EXIT_USER_ERROR) -> None:
    """Print the one line and leave at once.

    os._exit skips interpreter teardown: after a failure (a full disk, say) the libraries'
    background threads and exit hooks (Orbax, tensorstore, tensorboardX) would otherwise print
    their own tracebacks after this line. Everything distill_jax writes is committed or
    abandoned by then, and the run layer's files are written atomically.
    """
    sys.stdout.flush()
    sys.stderr.write(f"{prefix}: error: {_error_line(error)}\n")
    sys.stderr.flush()
    os._exit(code)


def _check_config_file(argv: list[str]) -> None:
    """A --config naming a missing file fails here, with the accepted form."""
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                raise ValueError(
                    f"--config={arg.split('=', 1)[1]}: no such file {path!r}: accepted a config "
                    "file, optionally with a variant, e.g. --config=configs/digits.py:smoke."
                )


def _flag_error(error: BaseException, argv: list[str]) -> ValueError:
    """A flag-parsing error as one readable sentence (config files report tracebacks as text)."""
    cause = next(
        (e for e in (error, error.__cause__, error.__context__) if isinstance(e, KeyError)), None
    )
    if cause is not None:
        key = str(cause.args[0]).strip("\"'") if cause.args else ""
        given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and key in a]
        shown = given[0] if given else f"--config...{key}"
        return ValueError(
            f"{shown}: the config has no key {key!r}; accepted the keys of "
            "distill_jax/config.py (base_config) and of the config file."
        )
    text = str(error)
    if "Traceback (most recent call last)" in text:
        words = text.split()
        flag = words[1].rstrip(":") if len(words) > 1 and words[0] == "flag" else "--config"
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = f"{flag}: {last.split(': ', 1)[-1]}"
    return ValueError(text)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (the --config file is loaded here) with the one-line error boundary."""
    try:
        _check_config_file(argv)
        return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - a config file can raise anything
        if _wants_traceback(argv):
            raise
        _exit_with("distill-jax", _flag_error(error, argv))


def _check_flags(argv: list[str]) -> str:
    """The command named by the first positional argument, with its required flags checked."""
    if len(argv) != 2:
        _usage_error(f"Expected exactly one command, got {argv[1:]!r}.")
    command = argv[1]
    if command not in COMMANDS:
        _usage_error(f"Unknown command {command!r}.")
    if _CONFIG.value is None and command not in WORKDIR_COMMANDS:
        _usage_error("--config is required, e.g. --config=configs/digits.py.")
    if not _WORKDIR.value and command not in NO_WORKDIR_COMMANDS:
        _usage_error("--workdir is required.")
    if command == "plan" and not _TOPOLOGY.value:
        _usage_error("plan needs --topology, e.g. --topology=v5e-8.")
    if command == "sample" and (_STEPS.value is None or _GUIDANCE.value is None or not _OUT.value):
        _usage_error("sample needs --steps, --guidance and --out.")
    if command == "export" and (_STEPS.value is None or not _OUT.value):
        _usage_error("export needs --steps and --out.")
    if command in ("sample", "export"):
        _check_sample_flags(command)
    return command


def _check_sample_flags(command: str) -> None:
    """Counts, ranges and finite numbers of the sample and export flags."""
    if _STEPS.value < 1:
        raise ValueError(f"--steps={_STEPS.value} is invalid: accepted an integer >= 1.")
    _schedule()
    if command == "export":
        return
    if not math.isfinite(_GUIDANCE.value):
        raise ValueError(f"--guidance={_GUIDANCE.value} is invalid: accepted a finite number.")
    if _NUM.value < 1:
        raise ValueError(f"--num={_NUM.value} is invalid: accepted an integer >= 1.")
    if not 0.0 < _T_START.value <= 1.0:
        raise ValueError(f"--t_start={_T_START.value} is invalid: accepted a number in (0, 1].")


def _schedule():
    """The --guidance_schedule flag as a GuidanceSchedule (a bad one: one clear line)."""
    from distill_jax.diffusion import guidance_schedule

    try:
        return guidance_schedule.parse_schedule(_SCHEDULE.value)
    except ValueError as error:
        raise ValueError(f"--guidance_schedule={_SCHEDULE.value!r}: {error}") from None


def _own_info_only(record) -> bool:
    """Log filter: distill_jax's INFO lines; other libraries' (Orbax, grain) from WARNING up."""
    # record.levelno is a Python logging level (absl's logging.WARNING is a verbosity, -1).
    if record.pathname.startswith(_PACKAGE_DIR):
        return True
    # Orbax warns on every read-only manager, which is how finished stages are read.
    return record.levelno >= python_logging.WARNING and not str(record.msg).startswith(
        "Given directory is read only"
    )


def _quiet_closed_loop_reports() -> None:
    """Drop one known, harmless report: "RuntimeError: Event loop is closed".

    When an Orbax restore fails (a damaged checkpoint), Orbax closes its asyncio loop while
    tensorstore still completes the other reads; their callbacks into the closed loop raise in
    tensorstore's threads, which print a traceback beside the one-line error. Every other
    exception still reaches the default hooks.
    """

    def closed_loop(error: BaseException | None) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    default_hook, default_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, error, trace):
        if not closed_loop(error):
            default_hook(kind, error, trace)

    def unraisablehook(report):
        if not closed_loop(report.exc_value):
            default_unraisable(report)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _refuse(command: str, error: BaseException, argv: list[str]) -> None:
    """Leave with the error's one line (--traceback or DISTILL_JAX_TRACEBACK=1: re-raise it).

    Bad input, a busy workdir, a failed save, non-finite training: the user's to fix, so the
    message, not a traceback.
    """
    if _TRACEBACK.value or _wants_traceback(argv):
        raise error
    _exit_with(f"distill-jax {command}".rstrip(), error)


def main(argv: list[str]) -> None:
    """Dispatch the command named by the first positional argument."""
    command = argv[1] if len(argv) > 1 else ""
    # Orbax and grain log every file operation at INFO; the console keeps our progress lines.
    logging.set_verbosity(logging.INFO)
    # ABSLHandler.handle delegates to its python_handler, so the filter goes there.
    logging.get_absl_handler().python_handler.addFilter(_own_info_only)
    try:  # before the heavy imports: a refused command line answers in a fraction of a second
        command = _check_flags(argv)
    except USER_ERRORS as error:
        _refuse(command, error, argv)
    from distill_jax import parallel
    from distill_jax.run import WorkdirBusyError
    from distill_jax.training import loop

    _quiet_closed_loop_reports()
    try:
        parallel.initialize_distributed()
        parallel.enable_compilation_cache()
        COMMAND_FUNCTIONS[command]()
    except loop.Preempted as stop:
        logging.warning("%s", stop)
        sys.exit(stop.exit_code)
    except (*USER_ERRORS, WorkdirBusyError) as error:
        _refuse(command, error, argv)
    except Exception as error:  # noqa: BLE001 - a collective raises JaxRuntimeError, not ours
        # Another process of the job died: say so in one line and leave without the shutdown
        # barrier (it would fail too, and abort with a page of C++ log).
        lost = parallel.lost_peer_error(error)
        if lost is None or _TRACEBACK.value or _wants_traceback(argv):
            raise
        _exit_with(f"distill-jax {command}".rstrip(), lost, EXIT_PEER_LOST)


def _importing() -> bool:
    from distill_jax.run import imported

    return (_TEACHER.value or "").startswith(imported.PREFIX)


def _run_config():
    """--config with the network of an imported teacher.

    The teacher is imported now (once) by --teacher=diffusers:DIR, or was earlier into the
    workdir; otherwise --config as it is.
    """
    from distill_jax.run import imported

    if _importing():
        start = time.perf_counter()
        config = imported.import_teacher(_CONFIG.value, _WORKDIR.value, _TEACHER.value)
        logging.info("[teacher] imported %s (%.1fs)", _TEACHER.value, time.perf_counter() - start)
        return config
    return imported.with_recorded_import(_CONFIG.value, _WORKDIR.value)


def _train(config=None) -> None:
    """The train command (and the first phase of run): the teacher."""
    from distill_jax.training import drivers

    config = config if config is not None else _run_config()
    start = time.perf_counter()
    state = drivers.train_teacher(
        config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
    if state is not None:
        _record("teacher", start)


def _distill(config=None) -> None:
    """The distill command (and the second phase of run): stage one and every round."""
    from distill_jax.training import drivers

    config = config if config is not None else _run_config()
    start = time.perf_counter()
    trained = drivers.distill_stages(
        config,
        _WORKDIR.value,
        only=_ONLY.value,
        teacher_dir=None if _importing() else _TEACHER.value,
        allow_config_change=_ALLOW_CONFIG_CHANGE.value,
    )
    if trained:
        _record("distillation", start)


def _run() -> None:
    """The run command: teacher (or its import), distillation, evaluation and report."""
    if _TEACHER.value and not _importing():
        raise ValueError(
            f"run --teacher={_TEACHER.value!r} is not accepted: run takes --teacher=diffusers:DIR "
            "(an import); a teacher stage directory goes to `distill --teacher=DIR`."
        )
    config = _run_config()
    _train(config)
    _distill(config)
    if config.data.name == "image_captions":  # no class labels: nothing to evaluate with
        from distill_jax.evaluation import evaluate

        logging.warning("[run] not evaluated: %s", evaluate.unlabelled_message(config.data.name))
        return
    _evaluate()


def _record(phase: str, start: float) -> None:
    """Log the wall time of a phase that did work and record it in workdir/timings.json."""
    import jax

    from distill_jax.evaluation import report

    seconds = time.perf_counter() - start
    if jax.process_index() == 0:
        logging.info("[%s] %.1fs", phase, seconds)
        report.record_timing(_WORKDIR.value, phase, seconds)


def _evaluate() -> None:
    """Evaluate the workdir (process 0 only) and write report.md.

    A --config replaces the recorded config's eval section.
    """
    import jax

    from distill_jax import parallel
    from distill_jax.evaluation import evaluate, report

    if jax.process_index() == 0:
        eval_config = _CONFIG.value.eval if _CONFIG.value is not None else None
        start = time.perf_counter()
        evaluate.evaluate_run(_WORKDIR.value, eval_config=eval_config, fresh=_FRESH.value)
        _record("evaluation", start)
        path = report.write_report(_WORKDIR.value)
        logging.info("[evaluate] wrote %s", path)
    # The other processes wait here rather than exit: an exiting process would wait in JAX's
    # shutdown barrier, which has a timeout shorter than a long evaluation.
    parallel.sync_processes("evaluate")


def _export() -> None:
    """The export command: flags -> export.export_sampler."""
    from distill_jax import export

    metadata = export.export_sampler(
        _WORKDIR.value,
        steps=_STEPS.value,
        out=_OUT.value,
        stochastic=_STOCHASTIC.value,
        batch_size=_BATCH_SIZE.value,
        platforms=tuple(_PLATFORMS.value),
        overwrite=_OVERWRITE.value,
        schedule=_schedule(),
        progress=True,
    )
    logging.info("[export] wrote %s (%d steps)", _OUT.value, metadata["steps"])


def _sample() -> None:
    """The sample command: flags -> sampling.sample_to_files."""
    from distill_jax import sampling
    from distill_jax.run import prompts as prompt_lib

    try:
        labels = [int(v) for v in _LABELS.value] if _LABELS.value else None
    except ValueError as error:
        raise ValueError(f"--labels={_LABELS.value!r} is invalid: accepted integers.") from error
    prompts = list(_PROMPT.value or [])
    if _PROMPTS_FILE.value:
        prompts += prompt_lib.read_prompts_file(_PROMPTS_FILE.value)
    npz, png = sampling.sample_to_files(
        _WORKDIR.value,
        model=_MODEL.value,
        steps=_STEPS.value,
        w=_GUIDANCE.value,
        num=_NUM.value,
        out=_OUT.value,
        seed=_SEED.value,
        labels=labels,
        stochastic=_STOCHASTIC.value,
        init=_INIT.value,
        t_start=_T_START.value,
        mask=_MASK.value,
        schedule=_schedule(),
        prompts=prompts or None,
        grid=_GRID.value,
        negative_prompt=_NEGATIVE_PROMPT.value,
    )
    logging.info("[sample] wrote %s and %s", npz, png)


def _plan() -> None:
    """The plan command: flags -> planning.plan_run; the table on stdout, the plan as JSON."""
    import jax

    # The plan compiles for the slice's abstract devices and runs nothing: it never takes
    # the TPU of the machine it runs on (a training job may be using it).
    jax.config.update("jax_platforms", "cpu")
    from distill_jax import planning
    from distill_jax.run import imported

    config = _CONFIG.value
    if _TEACHER.value:
        config = imported.plan_config(config, _TEACHER.value)
    elif config.model.get("from_import", False):
        raise ValueError(
            "This config's network comes from an imported teacher: plan it with "
            "--teacher=diffusers:DIR (a diffusers pipeline folder; only its JSON and tokenizer "
            "files are read, so the weights need not be downloaded yet)."
        )
    plan = planning.plan_run(
        config,
        _TOPOLOGY.value,
        mesh=_MESH.value,
        sample_batch=_SAMPLE_BATCH.value,
        stages=tuple(_STAGES.value),
        log=lambda line: logging.info("%s", line),
    )
    sys.stdout.write(planning.format_plan(plan))
    out = _OUT.value or f"plan_{plan['topology']}.json"
    planning.write_plan(plan, out)
    logging.info("[plan] wrote %s", out)


COMMAND_FUNCTIONS = {
    "train": _train,
    "distill": _distill,
    "run": _run,
    "sample": _sample,
    "evaluate": _evaluate,
    "export": _export,
    "plan": _plan,
}


def _print_help(argv: list[str]) -> None:
    """--help: cli_help's list of commands, or one command's flags; then exit 0."""
    try:
        text = cli_help.help_text(argv, COMMANDS)
    except ValueError as error:
        _exit_with("distill-jax", error)
    sys.stdout.write(text)
    sys.exit(0)


def run_main() -> None:
    """Console-script entry point."""
    if cli_help.help_requested(sys.argv):
        _print_help(sys.argv)
    app.run(main, argv=sys.argv, flags_parser=_parse_flags)
