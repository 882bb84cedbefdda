#!/usr/bin/env bash
# The whole test suite: create the environment, install, lint, check the import layers
# (.importlinter: a backward import fails the build), run pytest.
# pytest exits 5 when it collects no tests; that propagates as a failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
ruff check distill_jax configs tests bench launch
lint-imports --config .importlinter
exec python -m pytest "$@"
