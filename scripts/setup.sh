#!/usr/bin/env bash
# Creates .venv (once) with torch 2.14.1 / torchvision 0.29.1 and kdhooks with every extra.
# The mmdet extra needs an mmcv wheel with compiled ops: it is installed when one is found in
# $KDHOOKS_WHEELS, ../shared/wheels or the cache scripts/build_mmcv.sh fills.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.kdhooks-installed
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
  python -m pip install -q -e ".[all]"
  wheels=""
  torch_now="torch $(python -c 'import torch; print(torch.__version__)')"
  for dir in "${KDHOOKS_WHEELS:-}" ../shared/wheels "${XDG_CACHE_HOME:-$HOME/.cache}/kdhooks/wheels"; do
    [ -n "$dir" ] && ls "$dir"/mmcv-2.*.whl >/dev/null 2>&1 || continue
    # a wheel scripts/build_mmcv.sh made says which torch it was compiled against: skip one for another
    stamps=$(ls "$dir"/mmcv-2.*.whl.built-for 2>/dev/null || true)
    if [ -n "$stamps" ] && ! grep -qF "$torch_now " $stamps; then continue; fi
    wheels="$dir"; break
  done
  if [ -n "$wheels" ]; then
    python -m pip install -q --find-links "$wheels" -e ".[mmdet]"
  else
    echo "setup: no mmcv wheel found; the MMDetection tests will be skipped (see README: MMDetection)" >&2
  fi
  echo "$want" > "$stamp"
fi
