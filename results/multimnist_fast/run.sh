#!/usr/bin/env bash
# Three seeds of configs/multimnist_fast.py, one after the other, then eval.
# Run from the repository root; logs and metrics land beside this script.
set -euo pipefail
out=results/multimnist_fast
for seed in 0 1 2; do
  wd=workdirs/multimnist_fast_seed$seed
  start=$(date +%s)
  python train.py --config=configs/multimnist_fast.py --workdir=$wd \
    --config.seed=$seed --config.data.data_dir=../shared/data \
    > $out/train_seed$seed.log 2>&1
  echo "seed $seed wall_seconds $(( $(date +%s) - start ))" >> $out/wall_time.txt
  python eval.py --workdir=$wd > $out/eval_seed$seed.txt 2>/dev/null
  cp $wd/test_metrics.json $out/test_metrics_seed$seed.json
  cp $wd/metrics.jsonl $out/metrics_seed$seed.jsonl
  cp $wd/config.json $out/config_seed$seed.json
  cp $wd/eval/*.png $out/ 2>/dev/null || true
  for f in $out/*expert_weights.png; do [ -e "$f" ] && mv "$f" "${f%.png}_seed$seed.png" 2>/dev/null; done
  [ -e $out/training_curves.png ] && mv $out/training_curves.png $out/training_curves_seed$seed.png
done
