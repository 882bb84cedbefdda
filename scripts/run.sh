#!/usr/bin/env bash
# The main job: create the environment, install, run the default distillation pipeline on
# the bundled digits dataset. Extra arguments go to `distill-jax run`
# (e.g. --workdir=DIR, --config=configs/digits.py:smoke).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec distill-jax run --config=configs/digits.py --workdir="${WORKDIR:-runs/digits}" "$@"
