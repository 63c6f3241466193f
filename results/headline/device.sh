#!/usr/bin/env bash
# The lent GPU machine's side of results/headline/run_gpu.sh: sets up that
# machine's Python, restores earlier runs, runs, and packs the runs into OUT.
#
# Prepared here (both folders are git-ignored and travel with `carry`):
#   .whl/      ml_collections and tensorboardX wheels (the machine has JAX,
#              Flax, Optax and Orbax, not these): pip download --no-deps
#              --only-binary=:all: --python-version 3.12 -d .whl
#              ml_collections==1.1.0 tensorboardX==2.6.5
#   .devdata/  mnist/ with the four canonical IDX .gz files
#   .devruns/  optional: the <run>.tgz files an earlier call brought back;
#              their runs resume from their newest checkpoints
# Then, on the machine (the device tool's run, timeout_s=600):
#   bash results/headline/device.sh "$OUT" 480
# Seen on 2026-11-29: the Python with JAX there is /opt/torch/.venv/bin/python3
# (JAX 0.11.2); the first python3 on PATH has no JAX, and a symlink to the
# venv's python3 loses the venv (ModuleNotFoundError: jax).
set -uo pipefail
out=${1:?OUT dir}; total=${2:-480}
py=$(for p in /opt/torch/.venv/bin/python3 $(which -a python3 python); do
       [[ -x $p ]] && "$p" -c 'import jax, flax, optax, orbax.checkpoint' \
         2>/dev/null && echo "$p" && break; done)
[[ -n $py ]] || { echo 'no Python with jax, flax, optax and orbax'; exit 1; }
export PATH="$(dirname "$py"):$PATH"  # python and python3 of that venv
echo "python: $py"
timeout 120 python -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
runs=/tmp/runs
mkdir -p "$runs"
for f in .devruns/*.tgz; do [[ -e $f ]] && tar xzf "$f" -C "$runs"; done
bash results/headline/run_gpu.sh .devdata "$runs" "$total" "$out" 2>&1 |
  tee "$out/run_gpu.log"
