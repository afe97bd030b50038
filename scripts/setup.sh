#!/usr/bin/env bash
# Install kiln and its dependencies into the current Python environment.
# torch is installed first and pinned only when missing, so an existing CUDA build is kept;
# KILN_TORCH_SPEC overrides the pin (e.g. KILN_TORCH_SPEC="torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))' 2>/dev/null; then
  "$PY" -m pip install -q "${KILN_TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[dev,hf,tensorboard,eval,s3,fineweb]"
