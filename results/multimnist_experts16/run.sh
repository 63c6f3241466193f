#!/usr/bin/env bash
# Per-example DSelect-k over 16 CNN experts on MultiMNIST, dense against
# dispatched: configs/multimnist_experts16.py with experiments/grid.py's
# dselect_k_per_example (model.sparse_dispatch=False) and
# dselect_k_per_example_dispatch (True) variants, seed 0 (one each: a
# dense run takes about an hour on a 2-core CPU); then each run's
# metrics, gzipped, beside the table (the workdirs, with their
# checkpoints, stay out of git). Wall times are comparable only with
# nothing else running on the machine.
#
# DATA is a folder holding mnist/ (the MNIST IDX files; downloaded there,
# checksummed, when missing). grid.py skips the cells already in
# $out/cells: to run again, remove them first.
# Run from the repository root:
#   bash results/multimnist_experts16/run.sh DATA > results/multimnist_experts16/run.log 2>&1
set -euo pipefail
out=results/multimnist_experts16
DSELECT_DATA_DIR=$1 python experiments/grid.py --out=$out \
  --config=configs/multimnist_experts16.py --datasets=multi_mnist \
  --gates=dselect_k_per_example,dselect_k_per_example_dispatch --seeds=0
mkdir -p $out/metrics
for workdir in $out/workdirs/*/; do
  name=$(basename "$workdir")
  gzip -nc "$workdir/metrics.jsonl" > "$out/metrics/$name.jsonl.gz"
done
