#!/usr/bin/env bash
# The whole test suite: create the environment, install, lint, check the import layers
# (.importlinter: a backward import fails the build), run pytest.
# pytest exits 5 when it collects no tests; that propagates as a failure. The slowest 15 tests
# are listed at the end. (Running them on 2 pytest-xdist workers was measured slower on the
# 2-core machine: 25.5 against 24 minutes, the workers' XLA thread pools competing.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
ruff check distill_jax configs tests bench launch
lint-imports --config .importlinter
exec python -m pytest --durations=15 "$@"
