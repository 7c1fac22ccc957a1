#!/usr/bin/env bash
# Test jaxlora at its dependency floors: install constraints-floor.txt (the oldest versions
# pyproject.toml allows, pinned) into a fresh venv and run a fast subset of the tests.
# Not part of CI (it downloads old jax/jaxlib wheels: a few minutes); run it after raising or
# relying on a newer API:   scripts/test_floor.sh [VENV_DIR]
# torch (only for writing .pth files and the PyTorch reference in the tests) comes from the
# surrounding environment: the venv sees its site-packages, but the pins shadow them.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${TMPDIR:-/tmp}/jaxlora-floor-venv}"
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q -c constraints-floor.txt -r constraints-floor.txt
"$venv/bin/python" -m pip install -q --no-deps -e .
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "numpy", "ml_dtypes", "tqdm"):
    print(f"{name}=={md.version(name)}")
PY
JAX_PLATFORMS=cpu "$venv/bin/python" -m pytest -q -x tests/test_lit_mapping.py tests/test_lora.py tests/test_parity.py \
    tests/test_data.py tests/test_convert.py tests/test_steps.py tests/test_checkpoint.py
