"""The import-linter layers contract (.importlinter) holds, and it catches a backward import."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINT = pathlib.Path(sys.executable).with_name("lint-imports")


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [str(LINT), "--config", str(ROOT / ".importlinter")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_package_keeps_the_layers_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_a_backward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "distill_jax", tmp_path / "distill_jax")
    with (tmp_path / "distill_jax" / "run" / "stages.py").open("a") as handle:
        handle.write("\nfrom distill_jax.training import loop  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "distill_jax.run is not allowed to import distill_jax.training" in result.stdout
