"""The command line's help: `distill-jax --help` and `distill-jax COMMAND --help`.

`--help` lists the commands, one line each. `COMMAND --help` shows only that command's flags,
grouped as required, common and advanced, each with its default, read from the absl flags
that cli.py defines (so a default changed there changes here). absl's flat list of every
flag stays behind `--helpfull`.

A new flag or command goes into `COMMANDS` below; tests/test_docs.py fails while a flag that
distill_jax defines is shown by no command, and while docs/cli.md differs from this help
(`python scripts/cli_reference.py` rewrites it).
"""

from __future__ import annotations

import dataclasses
import re
import textwrap

from absl import flags

HELP_FLAGS = ("--help", "-h", "--helpshort", "-?")
WIDTH = 100
# "sample, export: ..." and "sample (text runs): ..." name their commands; the command's own
# help does not need to repeat that.
_COMMAND_PREFIX = re.compile(r"^[a-z]+(, [a-z]+)*( \([^)]*\))?: ")
# What absl adds to a flag's help: "<a|b>: " before an enum's, a note after a repeated one's.
_ABSL_ADDITIONS = re.compile(r"^<[^>]*>: |;\s+repeat this option to specify a list of values$")
# The placeholder a flag's value is shown as; others show their name in capitals.
_METAVARS = {
    "workdir": "DIR",
    "teacher": "DIR|diffusers:DIR",
    "steps": "N",
    "guidance": "W",
    "num": "K",
    "seed": "S",
    "labels": "L,L,...",
    "platforms": "P,P,...",
    "out": "PATH",
    "init": "FILE.npz",
    "prompts_file": "FILE",
    "prompt": "TEXT",
    "negative_prompt": "TEXT",
    "t_start": "T",
    "batch_size": "B",
    "topology": "SLICE",
    "mesh": "DATAxFSDP",
    "stages": "S,S,...",
    "sample_batch": "B",
}


@dataclasses.dataclass(frozen=True)
class CommandHelp:
    """One command: a one-line summary, a usage line, and its flags by group."""

    summary: str
    usage: str
    required: tuple[str, ...]
    common: tuple[str, ...] = ()
    advanced: tuple[str, ...] = ()
    overrides: bool = False  # accepts --config.KEY=VALUE

    def flag_names(self) -> tuple[str, ...]:
        """Every flag the command shows."""
        return self.required + self.common + self.advanced


_TRAINING = dict(required=("config", "workdir"), overrides=True)
COMMANDS = {
    "train": CommandHelp(
        summary="train (or resume) the guided teacher, or import one (--teacher=diffusers:DIR)",
        usage="--config=FILE[:variant] --workdir=DIR [--teacher=diffusers:DIR] [--config.KEY=...]",
        common=("teacher",),
        advanced=("allow_config_change", "traceback"),
        **_TRAINING,
    ),
    "distill": CommandHelp(
        summary="stage one, then every stage-two halving round (or --only one of them)",
        usage="--config=FILE[:variant] --workdir=DIR [--teacher=DIR|diffusers:DIR] [--only=...]",
        common=("teacher", "only"),
        advanced=("allow_config_change", "traceback"),
        **_TRAINING,
    ),
    "run": CommandHelp(
        summary="every stage (train, distill), then evaluate and write report.md",
        usage="--config=FILE[:variant] --workdir=DIR [--teacher=diffusers:DIR] [--config.KEY=...]",
        common=("teacher",),
        advanced=("allow_config_change", "traceback"),
        **_TRAINING,
    ),
    "sample": CommandHelp(
        summary="images from a run's teacher or students into an .npz and a PNG grid",
        usage="--workdir=DIR --steps=N --guidance=W --out=FILE.npz [flags]",
        required=("workdir", "steps", "guidance", "out"),
        common=("model", "num", "labels", "seed", "stochastic", "guidance_schedule"),
        advanced=(
            "prompt",
            "prompts_file",
            "negative_prompt",
            "init",
            "t_start",
            "mask",
            "grid",
            "traceback",
        ),
    ),
    "evaluate": CommandHelp(
        summary="FD, IS, accuracy, FD to teacher of every sampler; plots, grids, report.md",
        usage="--workdir=DIR [--config=FILE to replace the recorded eval section] [--fresh]",
        required=("workdir",),
        common=("config", "fresh"),
        advanced=("traceback",),
        overrides=True,
    ),
    "export": CommandHelp(
        summary="a self-contained sampler of one student (needs only jax and numpy to run)",
        usage="--workdir=DIR --steps=N --out=DIR [flags]",
        required=("workdir", "steps", "out"),
        common=("stochastic", "guidance_schedule", "batch_size", "platforms"),
        advanced=("overwrite", "traceback"),
    ),
    "plan": CommandHelp(
        summary="compile the train steps and samplers for a TPU slice here: memory, FLOPs, times",
        usage=(
            "--config=FILE[:variant] --topology=SLICE [--teacher=diffusers:DIR] "
            "[--mesh=DATAxFSDP] [--out=FILE.json]"
        ),
        required=("config", "topology"),
        common=("teacher", "mesh", "stages", "sample_batch", "out"),
        advanced=("traceback",),
        overrides=True,
    ),
}


def help_requested(argv: list[str]) -> bool:
    """Whether the command line asks for the short help (absl's --helpfull is left alone)."""
    return any(arg in HELP_FLAGS for arg in argv[1:])


def help_text(argv: list[str], commands: tuple[str, ...]) -> str:
    """The help for `argv`: a command's flags when it names one, else the list of commands.

    Raises ValueError for a first argument that is not a command.
    """
    positional = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not positional:
        return overview(commands)
    if positional[0] not in commands:
        raise ValueError(f"Unknown command {positional[0]!r}. Commands: {', '.join(commands)}.")
    return command_help(positional[0])


def overview(commands: tuple[str, ...]) -> str:
    """`distill-jax --help`: one line per command."""
    width = max(len(c) for c in commands) + 2
    lines = ["usage: distill-jax COMMAND [flags]   (or: python -m distill_jax COMMAND ...)", ""]
    lines.append("commands:")
    for command in commands:
        summary = COMMANDS[command].summary if command in COMMANDS else "(no help yet)"
        lines.append(f"  {command:<{width}}{summary}")
    lines += [
        "",
        "distill-jax COMMAND --help shows that command's flags; --helpfull lists every flag.",
        "Reference: docs/cli.md.",
    ]
    return "\n".join(lines) + "\n"


def command_help(command: str) -> str:
    """`distill-jax COMMAND --help`: the command's flags by group, each with its default."""
    spec = COMMANDS[command]
    lines = [
        f"usage: distill-jax {command} {spec.usage}",
        "",
        spec.summary[0].upper() + spec.summary[1:] + ".",
    ]
    groups = (("required", spec.required), ("common", spec.common), ("advanced", spec.advanced))
    for title, names in groups:
        if not names and not (title == "common" and spec.overrides):
            continue
        lines += ["", f"{title}:"]
        lines += [line for name in names for line in _flag_lines(flags.FLAGS[name], title)]
        if title == "common" and spec.overrides:
            lines += _entry("--config.KEY=VALUE", "override any config key (docs/configs.md)")
    return "\n".join(lines) + "\n"


def _flag_lines(flag: flags.Flag, group: str) -> list[str]:
    """One flag: its form and its help with the default, wrapped to WIDTH."""
    text = _COMMAND_PREFIX.sub("", _ABSL_ADDITIONS.sub("", flag.help.strip()))
    text = text[0].upper() + text[1:] if text else text
    if group != "required" and "(default" not in text:
        text = f"{text} (default: {_default(flag)})"
    return _entry(_form(flag), text)


def _entry(form: str, text: str) -> list[str]:
    """A flag's form in a 26-column field, its text beside it (or below, if the form is long)."""
    indent = " " * 28
    head = f"  {form:<26}" if len(form) <= 25 else f"  {form}\n{indent}"
    wrapped = textwrap.wrap(text, WIDTH - len(indent))
    return [head + wrapped[0]] + [indent + line for line in wrapped[1:]]


def _form(flag: flags.Flag) -> str:
    """How the flag is written: --stochastic, --model=teacher|student, --steps=STEPS."""
    if isinstance(flag, flags.BooleanFlag):
        return f"--{flag.name}"
    values = getattr(flag.parser, "enum_values", None)
    if values:
        return f"--{flag.name}={'|'.join(values)}"
    if flag.name == "config":
        return "--config=FILE[:variant]"
    return f"--{flag.name}={_METAVARS.get(flag.name, flag.name.upper())}"


def _default(flag: flags.Flag) -> str:
    """The default as it is typed on the command line."""
    value = flag.default
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)
