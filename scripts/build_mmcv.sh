#!/usr/bin/env bash
# Builds mmcv with its compiled ops from the PyPI source distribution, for the torch of the active Python
# environment, into a wheel cache that scripts/setup.sh and `pip install --find-links` reuse.
#
#   . .venv/bin/activate && scripts/build_mmcv.sh    # CPU ops: 8 min measured on 2 cores (20+ when busy)
#   scripts/build_mmcv.sh --cuda                      # CUDA ops too (nvcc matching torch's CUDA must be installed)
#   pip install --find-links ~/.cache/kdhooks/wheels -e ".[mmdet]"
#
# PyPI has mmcv only as source, and OpenMMLab's prebuilt wheels stop at older torch versions. A wheel built
# here fits one torch version (its C++ ABI) and one Python: the build records them next to the wheel
# (<wheel>.built-for) and is reused while they match; a new torch triggers a new build (or pass --force).
# Options by environment: MMCV_VERSION (2.1.0), MAX_JOBS (all cores), CXX_STD (c++20: torch 2.14's headers
# need C++20, mmcv's setup.py asks for c++14/c++17), XDG_CACHE_HOME, PYTHON.
set -euo pipefail

MMCV_VERSION=${MMCV_VERSION:-2.1.0}
CXX_STD=${CXX_STD:-c++20}
PY=${PYTHON:-python}
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kdhooks/wheels"
cuda=0
force=0
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_mmcv: unknown option $arg (use --cuda, --force)" >&2; exit 2 ;;
  esac
done

if ! built_for=$("$PY" -c 'import sys, torch
print(f"mmcv '"$MMCV_VERSION"' torch {torch.__version__} cp{sys.version_info[0]}{sys.version_info[1]} "
      f"cxx11abi={int(torch._C._GLIBCXX_USE_CXX11_ABI)} cuda='"$cuda"'")' 2>/dev/null); then
  echo "build_mmcv: torch is not importable by $PY; install torch first (the build compiles against it)" >&2
  exit 1
fi
for stamp in "$CACHE"/mmcv-"$MMCV_VERSION"-*.whl.built-for; do
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$built_for" ] && [ -f "${stamp%.built-for}" ] && [ "$force" = 0 ]; then
    echo "build_mmcv: reusing ${stamp%.built-for} ($built_for)"
    exit 0
  fi
done
command -v "${CXX:-g++}" >/dev/null || { echo "build_mmcv: no C++ compiler (${CXX:-g++}); install g++ >= 10" >&2; exit 1; }

echo "build_mmcv: building $built_for into $CACHE"
# the build runs without isolation, against this environment's torch: it needs these here
# (setuptools<81 because mmcv's setup.py, like mmengine at run time, imports pkg_resources)
"$PY" -m pip install -q "setuptools<81" wheel ninja psutil

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# --no-build-isolation: pip reads the sdist's metadata by running its setup.py, which imports torch
"$PY" -m pip download -q "mmcv==$MMCV_VERSION" --no-deps --no-binary :all: --no-build-isolation -d "$work"
tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
src="$work/mmcv-$MMCV_VERSION"
sed -i "s/-std=c++1[47]/-std=$CXX_STD/g" "$src/setup.py"

start=$SECONDS
if [ "$cuda" = 1 ]; then
  gpu_env=(FORCE_CUDA=1)
else
  # no GPU visible: torch.utils.cpp_extension builds the CPU ops only
  gpu_env=(FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=)
fi
# -g0: without debug information the build takes half the time and the wheel is 1.3 MB instead of 32 MB
(cd "$src" && env MMCV_WITH_OPS=1 "${gpu_env[@]}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" CFLAGS="-O2 -DNDEBUG -g0" \
  "$PY" -m pip wheel --no-deps --no-build-isolation -w "$work/dist" .)

mkdir -p "$CACHE"
wheel=$(ls "$work"/dist/mmcv-"$MMCV_VERSION"-*.whl)
rm -f "$CACHE/$(basename "$wheel")" "$CACHE/$(basename "$wheel").built-for"
cp "$wheel" "$CACHE/"
echo "$built_for" > "$CACHE/$(basename "$wheel").built-for"
echo "build_mmcv: $CACHE/$(basename "$wheel") in $(( (SECONDS - start) / 60 )) min"
echo "install:    $PY -m pip install --find-links $CACHE -e \".[mmdet]\""
