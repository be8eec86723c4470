#!/usr/bin/env bash
# The GPU proof of both stages in one call (issue 12): every number to JSON files under --out.
#
#   bash bench/gpu/run.sh --out DIR                       # one GPU, full sizes (about 8 minutes on an H100)
#   bash bench/gpu/run.sh --device cpu --tiny --out DIR   # the same code paths on the CPU (a few minutes)
#   ... [--work DIR] [--only stage_one_parity,memory]     # see bench/gpu/proof.py --help
#
# Where deepspeed, datasets, trl, zstandard or selpipe itself cannot be imported (the GPU image
# lacks them and reaches no package index), the wheels that bench/gpu/prepare_wheels.sh put in
# bench/gpu/wheels/ are installed first, into a folder of their own put ahead on PYTHONPATH, so
# the image's own packages stay as they are. See bench/gpu/README.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

if ! missing=$("$PYTHON" -c "import deepspeed, datasets, trl, zstandard, selpipe.cli.app" 2>&1); then
    shopt -s nullglob
    wheels=("$HERE"/wheels/*.whl)
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "run.sh: $PYTHON cannot import what the proof needs ($(tail -n 1 <<<"$missing")) and bench/gpu/wheels/" \
             "is empty: run bench/gpu/prepare_wheels.sh where pip reaches PyPI and carry bench/gpu/wheels" >&2
        exit 2
    fi
    SITE=${PROOF_SITE:-/tmp/selpipe-proof-site}
    echo "run.sh: installing ${#wheels[@]} carried wheels into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" - <<'EOF'
import importlib.metadata as m
print("run.sh:", ", ".join(f"{n} {m.version(n)}" for n in ("torch", "transformers", "deepspeed", "trl", "datasets", "selpipe")))
EOF
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$HERE/proof.py" "$@"
