#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv if needed, then runs the recipe on a local Ray
# cluster started for it. Extra arguments are config overrides (e.g. preset=tiny data.root=/my/corpora).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python jobs/recipe.py "$@"
