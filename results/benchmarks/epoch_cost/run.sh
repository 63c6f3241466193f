#!/usr/bin/env bash
# What evaluation adds to a training epoch, with and without the fused
# evaluation: configs/paddlerec.py (validation and test pass after every
# epoch), 2 epochs each, one after the other, nothing else running; the
# second epoch is measured (the first compiles).
# Run from the repository root with MNIST in DATA:
#   bash results/benchmarks/epoch_cost/run.sh DATA WORKDIRS
set -euo pipefail
out=results/benchmarks/epoch_cost
for fused in True False; do
  name=fused_eval_$fused
  rm -rf "$2/$name" && mkdir -p "$out/$name"
  DSELECT_DATA_DIR=$1 python train.py --config=configs/paddlerec.py \
    --workdir="$2/$name" --config.num_epochs=2 \
    --config.model.fused_eval=$fused 2> "$out/$name/train.log"
done
python scripts/time_to_accuracy.py --epoch_costs "$out"/fused_eval_*
