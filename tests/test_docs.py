"""Docs that cannot rot: README.md and docs/*.md are checked against the code.

- Every relative link (and its #anchor) and every repository file a page names exists.
- Every shell block fenced as ```bash runnable runs and exits 0, in a scratch directory where
  `runs/digits` is the session's smoke run (`distill-jax run --config=configs/digits.py:smoke`),
  `configs/`, `scripts/`, `launch/` and `distill_jax/` are the repository's, and every
  `--config=configs/NAME.py` without a variant gets `:smoke`. Blocks must only read
  `runs/digits` (it is shared by the session); what they write lands in the scratch directory.
- docs/cli.md equals what `distill-jax --help` and `distill-jax COMMAND --help` print
  (`python scripts/cli_reference.py` rewrites it), and every flag distill_jax defines is
  shown by some command's help.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# A repository file a page names: a path with one of these suffixes.
NAMED_FILE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.(?:py|sh|ipynb|sbatch|md|png|txt))\b")
# Paths under these folders are the repository's (distill_jax's subpackages may be named
# without the distill_jax/ prefix); others (runs/..., exported/...) are a workdir's or a user's.
REPO_FOLDERS = {
    "distill_jax",
    "configs",
    "tests",
    "bench",
    "launch",
    "scripts",
    "docs",
    "requirements",
} | {p.name for p in (ROOT / "distill_jax").iterdir() if p.is_dir() and p.name != "__pycache__"}
# Bare file names that belong to a workdir, an exported artifact or a user, not the repository.
NOT_REPO_FILES = {"run_sampler.py", "report.md", "results.md", "prompts.txt"}
# What a runnable block may not contain: commands that train (minutes) or write a workdir.
SLOW_COMMANDS = re.compile(r"distill-jax\s+(train|distill|run)\b|scripts/(run|test)\.sh")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _relative_links(page: pathlib.Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def test_relative_links_and_anchors_resolve():
    """Every [text](path#anchor) of every page points at a file, and at a heading in it."""
    broken = []
    for page in PAGES:
        for target in _relative_links(page):
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    assert not broken, "dead links:\n" + "\n".join(broken)


def _named_files(page: pathlib.Path) -> set[str]:
    """Paths of repository files named in a page: in code spans, code blocks and link text."""
    names = set(NAMED_FILE.findall(page.read_text(encoding="utf-8")))
    return {n for n in names if not n.startswith(("http", "www.")) and "*" not in n}


def _exists_in_repo(name: str, tracked: set[str]) -> bool:
    """A path from the root or from distill_jax/; a bare file name anywhere in the repo."""
    if "/" in name:
        return name.rstrip("/") in tracked or f"distill_jax/{name}" in tracked
    return any(path.rsplit("/", 1)[-1] == name for path in tracked)


def _tracked_files() -> set[str]:
    """Files of the working tree, tracked or new (what a commit of it would hold)."""
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return {line for line in result.stdout.splitlines() if (ROOT / line).exists()}


def test_named_files_exist():
    """Every `file.py`-like path a page names is in the repository (workdir files aside)."""
    tracked = _tracked_files()
    missing = []
    for page in PAGES:
        for name in sorted(_named_files(page)):
            is_repo_path = "/" not in name or name.split("/", 1)[0] in REPO_FOLDERS
            if name in NOT_REPO_FILES or not is_repo_path:
                continue
            if not _exists_in_repo(name, tracked):
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert not missing, "files named in the docs that do not exist:\n" + "\n".join(missing)


def _runnable_blocks() -> list[tuple[str, str]]:
    blocks = []
    for page in PAGES:
        for info, body in FENCE.findall(page.read_text(encoding="utf-8")):
            if info.split()[:2] == ["bash", "runnable"]:
                blocks.append((f"{page.relative_to(ROOT)}#{len(blocks)}", body))
    return blocks


def smoke_substituted(block: str) -> str:
    """The block as the test runs it: every config file without a variant gets `:smoke`."""
    return re.sub(r"(--config=configs/\w+\.py)(?=[\s\"']|$)", r"\1:smoke", block)


def test_runnable_blocks_are_few_and_cheap():
    """At least the CLI reference's and export's blocks are runnable; none trains."""
    blocks = _runnable_blocks()
    assert len(blocks) >= 3, blocks
    slow = [name for name, body in blocks if SLOW_COMMANDS.search(body)]
    assert not slow, f"runnable blocks that train or run every stage: {slow}"


@pytest.mark.parametrize("name, block", _runnable_blocks(), ids=[n for n, _ in _runnable_blocks()])
def test_runnable_block_runs(name, block, smoke_workdir, tmp_path):
    """The block, smoke-substituted, exits 0 in a scratch directory (see the module doc)."""
    for link in ("configs", "scripts", "launch", "distill_jax"):
        (tmp_path / link).symlink_to(ROOT / link)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "digits").symlink_to(smoke_workdir)
    env = dict(os.environ)
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", smoke_substituted(block)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    output = (result.stdout[-2000:] + result.stderr[-3000:]).strip()
    assert result.returncode == 0, f"{name} failed (exit {result.returncode}):\n{block}\n{output}"
    print(f"{name}: {seconds:.1f}s")


def _cli_reference():
    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "scripts" / "cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_help():
    """docs/cli.md below its marker is exactly what the command line's --help prints."""
    reference = _cli_reference()
    page = reference.PAGE.read_text(encoding="utf-8")
    assert reference.MARKER in page
    documented = page.split(reference.MARKER, 1)[1].strip("\n")
    expected = reference.generated_part().strip("\n")
    assert documented == expected, (
        "docs/cli.md differs from distill-jax --help: run python scripts/cli_reference.py"
    )


def test_every_flag_is_shown_by_a_command():
    """A flag distill_jax defines appears in some command's --help (hence in docs/cli.md)."""
    from absl import flags

    from distill_jax import cli, cli_help

    defined = {
        flag.name
        for module, module_flags in flags.FLAGS.flags_by_module_dict().items()
        if module.startswith("distill_jax")
        for flag in module_flags
    }
    shown = {name for spec in cli_help.COMMANDS.values() for name in spec.flag_names()}
    assert defined - shown == set(), f"flags no command's --help shows: {defined - shown}"
    assert set(cli.COMMANDS) == set(cli_help.COMMANDS), (
        "a command without help, or help without a command"
    )
