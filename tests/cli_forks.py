"""Run many command lines, each in its own process forked after the imports they share.

`python tests/cli_forks.py CASES.json` reads [{"id", "argv", "out"}, ...]: argv is either a
`distill-jax` command line (without the program name) or ["SCRIPT", path, args...] for a script
run as `python path args...`. Each case runs in a child forked from this process once it has
imported the command line's modules, so the ~1.5 s of imports (jax, grain, tfds) is paid once
instead of once per case; the child is otherwise the process a user starts: `cli.run_main` with
that sys.argv, its own stdout and stderr, its exit code and atexit handlers. JAX's backends are
not initialised before the fork (that is checked), so no device or thread state is shared.
Writes {id: {"returncode", "stdout", "stderr"}} as JSON to each case's "out" file.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import jax._src.xla_bridge as xla_bridge

from distill_jax import cli, export, sampling  # noqa: F401 - the commands' heavy imports, once
from distill_jax.run import imported  # noqa: F401
from distill_jax.training import drivers, loop  # noqa: F401

MAX_CHILDREN = 3


def _child(argv: list[str], out: str) -> None:
    """The body of one forked child: run `argv`, write what it printed and its exit code."""
    stdout, stderr = open(out + ".stdout", "w"), open(out + ".stderr", "w")
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    code = 0
    try:
        if argv[0] == "SCRIPT":
            sys.argv = argv[1:]
            runpy.run_path(argv[1], run_name="__main__")
        else:
            sys.argv = [os.path.join(os.path.dirname(cli.__file__), "__main__.py"), *argv]
            cli.run_main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported as the interpreter would, exit 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _collect(pid: int, status: int, running: dict[int, dict]) -> None:
    case = running.pop(pid)
    out = case["out"]
    with open(out + ".stdout") as f_out, open(out + ".stderr") as f_err:
        result = {
            "returncode": os.waitstatus_to_exitcode(status),
            "stdout": f_out.read(),
            "stderr": f_err.read(),
        }
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    """Fork a child per case, at most MAX_CHILDREN at a time, and wait for all of them."""
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    if xla_bridge._backends:  # a forked child would share the parent's device state
        raise SystemExit("cli_forks.py: JAX's backends were initialised before the fork")
    running: dict[int, dict] = {}
    for case in cases:
        while len(running) >= MAX_CHILDREN:
            _collect(*os.wait(), running)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(case["argv"], case["out"])
        running[pid] = case
    while running:
        _collect(*os.wait(), running)


if __name__ == "__main__":
    main()
