#!/usr/bin/env bash
# Runs the digits demo: teacher, student alone, student + KD + FitNets over 3 seeds (sets up .venv first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec kdhooks demo "$@"
