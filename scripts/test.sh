#!/usr/bin/env bash
# The whole test suite: create the environment, install, lint, check the import layers
# (.importlinter: a backward import fails the build), run pytest.
# pytest exits 5 when it collects no tests; that propagates as a failure.
# Tests run on DISTILL_JAX_TEST_WORKERS pytest-xdist workers (default 2, one per core of the
# 2-core reference machine; 0 runs them in this process); the slowest 15 are listed at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
ruff check distill_jax configs tests bench launch
lint-imports --config .importlinter
exec python -m pytest -n "${DISTILL_JAX_TEST_WORKERS:-2}" --durations=15 "$@"
