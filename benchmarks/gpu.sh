#!/usr/bin/env bash
# Everything a GPU is wanted for, in one command on one GPU:
#   1. the step benchmark, ours against PyTorch on the same GPU
#      (benchmarks/train_speed.py, alternating windows);
#   2. the 100-epoch run of configs/paddlerec.py (PaddleRec's statistic,
#      like for like), timed, then the three seeds of configs/multimnist.py.
#
#   bash benchmarks/gpu.sh OUT_DIR [RUN ...]
#
# RUNs are names of experiments/paddlerec_comparison.sh (default: paddlerec
# multimnist_seed0 multimnist_seed1 multimnist_seed2). Checkpoints go to
# $RUNS_DIR (default /tmp/dselect_runs); each finished run's files land in
# results/paddlerec_comparison/<run>/ and are copied to OUT_DIR with the
# benchmark table and the wall time of every run. Needs JAX with CUDA
# (pip install -e '.[cuda12]'), PyTorch with CUDA for the PyTorch rows, and
# the raw MNIST files in $DSELECT_DATA_DIR (or the cache, or a download).
# On a machine that cannot install, carry the wheels of what its Python
# lacks (ml_collections, tensorboardX) and put them on PYTHONPATH first, and
# the four MNIST .gz files under $DSELECT_DATA_DIR/mnist/.
# Written and run on CPUs only so far; no GPU has run it yet.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT_DIR [RUN ...]}
shift
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(paddlerec multimnist_seed0 multimnist_seed1 multimnist_seed2)
runs_dir=${RUNS_DIR:-/tmp/dselect_runs}
mkdir -p "$out" "$runs_dir"
export PYTHONUNBUFFERED=1

{ nvidia-smi -L || true; python -c 'import jax; print(jax.__version__, jax.devices())'; } \
  | tee "$out/devices.txt"
python -m benchmarks.train_speed --torch_device=cuda --threads="$(nproc)" \
  --contenders=ours,ours_vmap,ours_loop,torch_nchw,torch_channels_last,torch_compile \
  --steps="${STEPS:-100}" --rounds="${ROUNDS:-5}" --out="$out/train_speed.md"

for run in "${runs[@]}"; do
  start=$(date +%s)
  bash experiments/paddlerec_comparison.sh "$runs_dir" "$run" | tee -a "$out/runs.log"
  echo "$run: $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
  cp -r "results/paddlerec_comparison/$run" "$out/"
done
