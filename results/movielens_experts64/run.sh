#!/usr/bin/env bash
# Per-example DSelect-k over 64 experts on MovieLens-100K, dense against
# dispatched: configs/movielens_experts64.py with experiments/grid.py's
# dselect_k_per_example (model.sparse_dispatch=False) and
# dselect_k_per_example_dispatch (True) variants, seeds 0, 1, 2, the two
# variants alternating seed by seed so that both see the machine alike;
# then each run's metrics, gzipped, beside the table (the workdirs, with
# their checkpoints, stay out of git). Wall times are comparable only
# with nothing else running on the machine.
#
# DATA is a folder holding movielens/ (see results/movielens/run.sh).
# grid.py skips the cells already in $out/cells: to run again, remove
# them first (run_info.json then records the tree as dirty by those
# removed result files; the code is its commit's).
# Run from the repository root:
#   bash results/movielens_experts64/run.sh DATA > results/movielens_experts64/run.log 2>&1
set -euo pipefail
out=results/movielens_experts64
for seed in 0 1 2; do
  DSELECT_DATA_DIR=$1 python experiments/grid.py --out=$out \
    --config=configs/movielens_experts64.py --datasets=movielens \
    --gates=dselect_k_per_example,dselect_k_per_example_dispatch --seeds=$seed
done
mkdir -p $out/metrics
for workdir in $out/workdirs/*/; do
  name=$(basename "$workdir")
  gzip -nc "$workdir/metrics.jsonl" > "$out/metrics/$name.jsonl.gz"
done
