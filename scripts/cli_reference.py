"""Rewrite docs/cli.md from `distill-jax --help` and `distill-jax COMMAND --help`.

Usage: python scripts/cli_reference.py [--check]

The page keeps its hand-written head (everything above MARKER); below it, one section per
command holds that command's help exactly as the command line prints it. tests/test_docs.py
compares the page with the help, so a flag added without running this fails the suite.
--check only compares and exits 1 on a difference.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"
MARKER = "<!-- Generated below by scripts/cli_reference.py from --help: do not edit by hand. -->"


def help_output(*args: str) -> str:
    """What `python -m distill_jax ARGS --help` prints (it must exit 0)."""
    result = subprocess.run(
        [sys.executable, "-m", "distill_jax", *args, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"distill-jax {' '.join(args)} --help failed: {result.stderr.strip()}")
    return result.stdout


def commands() -> list[str]:
    """The commands `distill-jax --help` lists, in its order."""
    lines = help_output().splitlines()
    start = lines.index("commands:") + 1
    listed = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        listed.append(line.split()[0])
    return listed


def generated_part() -> str:
    """The reference: the overview, then every command's own help, each in a text block."""
    parts = ["## distill-jax --help", "", "```text", help_output().rstrip("\n"), "```"]
    for command in commands():
        parts += ["", f"## distill-jax {command}", "", "```text"]
        parts += [help_output(command).rstrip("\n"), "```"]
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    """Rewrite the page (or, with --check, report whether it is current)."""
    text = PAGE.read_text(encoding="utf-8")
    if MARKER not in text:
        raise SystemExit(f"{PAGE}: the line {MARKER!r} is missing.")
    head = text.split(MARKER, 1)[0]
    page = head + MARKER + "\n\n" + generated_part()
    if "--check" in argv:
        current = page == text
        print("docs/cli.md is current" if current else "docs/cli.md differs from --help")
        return 0 if current else 1
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
