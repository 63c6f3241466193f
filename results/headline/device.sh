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
start=$(date +%s)
# Every stage is stamped into OUT as well, so a call cut short still brings
# back how far it got.
stamp() { echo "== $(( $(date +%s) - start )) s: $*" | tee -a "$out/stages.log"; }
stamp "start on $(hostname)"
py=$(for p in /opt/torch/.venv/bin/python3 $(which -a python3 python); do
       [[ -x $p ]] && timeout 60 "$p" -c \
         'import jax, flax, optax, orbax.checkpoint' 2>/dev/null &&
         echo "$p" && break; done)
[[ -n $py ]] || { stamp 'no Python with jax, flax, optax and orbax'; exit 1; }
export PATH="$(dirname "$py"):$PATH"  # python and python3 of that venv
stamp "python: $py"
# No index and no version check: the machine has no network to wait for.
PIP_NO_INPUT=1 timeout 120 python -m pip install -q --no-index --no-deps \
  --no-compile --no-cache-dir --disable-pip-version-check --target /tmp/site \
  .whl/*.whl || { stamp "pip install failed ($?)"; exit 1; }
export PYTHONPATH=/tmp/site
stamp 'wheels installed'
runs=/tmp/runs
mkdir -p "$runs"
for f in .devruns/*.tgz; do [[ -e $f ]] && tar xzf "$f" -C "$runs"; done
stamp "restored: $(ls "$runs" | tr '\n' ' ')"
# run_gpu.sh keeps to TOTAL itself; this bound holds if one of its stages
# does not.
left=$(( total - ($(date +%s) - start) ))
timeout -k 10 $(( left + 30 )) bash results/headline/run_gpu.sh .devdata \
  "$runs" "$left" "$out" 2>&1 | tee "$out/run_gpu.log"
stamp "run_gpu.sh exit ${PIPESTATUS[0]}"
if ! compgen -G "$out/*.tgz" > /dev/null; then  # Cut short before packing.
  for d in "$runs"/*/; do
    name=$(basename "$d")
    tar czf "$out/$name.tgz" -C "$runs" --exclude=.lock "$name"
  done
  stamp "packed: $(ls "$out")"
fi
