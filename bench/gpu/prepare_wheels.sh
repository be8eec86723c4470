#!/usr/bin/env bash
# Fill bench/gpu/wheels/ with what the GPU machine lacks, built or downloaded here where pip
# reaches PyPI; bench/gpu/run.sh installs them there (see bench/gpu/README.md).
#
#   bash bench/gpu/prepare_wheels.sh      # from the repository root, after `make` built .venv
#
# The lent GPU image (Python 3.12, torch 2.11, transformers 5.17, accelerate, peft, pyarrow,
# typer, tqdm, tensorboard, pandas, ...) has no DeepSpeed, datasets, TRL or zstandard, nor
# DeepSpeed's pydantic, hjson, and datasets' dill and multiprocess. Each is taken at the version
# this checkout's .venv runs, so the GPU proves the same code the CPU tests do:
#   - deepspeed: built with DS_BUILD_OPS=0, a pure wheel of about 2 MB (no compiled ops; the proof
#     runs torch's AdamW, so none is needed);
#   - binary wheels (zstandard, pydantic-core) for CPython $PY_VERSION on manylinux x86-64;
#   - selpipe itself, from this tree (run this again after changing the code: summary.json
#     says whether the selpipe that ran matches the tree).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${VENV:-$REPO/.venv}
PY_VERSION=${PY_VERSION:-3.12}   # the GPU image's Python
OUT=$HERE/wheels
PURE="datasets trl hjson dill multiprocess pydantic annotated-types typing-inspection typing-extensions"
# EXTRA names more of .venv's packages to carry, where the image's own version is too old for the
# others (datasets wants pyarrow >= 24, fsspec <= 2026.9): EXTRA="pyarrow" adds about 40 MB.
BINARY="zstandard pydantic-core ${EXTRA:-}"

version() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$OUT"
mkdir -p "$OUT"
# Built afresh (--no-cache-dir): pip's cache holds the Makefile's CPU build, whose compiled
# shared-memory op makes it a CPython-3.11-only wheel.
env -u DS_BUILD_SHM_COMM DS_BUILD_OPS=0 "$VENV/bin/pip" wheel -q --no-cache-dir --no-deps --no-build-isolation \
    -w "$OUT" "deepspeed==$(version deepspeed)"
"$VENV/bin/pip" wheel -q --no-deps -w "$OUT" "$REPO"
pinned=()
for name in $PURE $BINARY; do pinned+=("$name==$(version "$name")"); done
"$VENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$OUT" \
    --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    "${pinned[@]}"
ls -1 "$OUT"
echo "prepare_wheels.sh: $(du -sh "$OUT" | cut -f1) in $OUT (the device carries at most 64 MiB with the tree)"
