#!/usr/bin/env bash
# PaddleRec's setup (configs/paddlerec.py: one shared DSelect-k gate,
# paretomtl-style MultiMNIST, Adam 1e-3 constant, batch 256) for one seed, in
# 5 epochs instead of 100 (the 100 epochs would take about 8 hours on this
# 2-core CPU). Run from the repository root:
#   bash results/paddlerec_parity/run.sh
set -euo pipefail
out=results/paddlerec_parity
wd=workdirs/paddlerec_parity_seed0
start=$(date +%s)
python train.py --config=configs/paddlerec.py --workdir=$wd \
  --config.num_epochs=5 --config.data.data_dir=../shared/data \
  > $out/train_seed0.log 2>&1
echo "seed 0 wall_seconds $(( $(date +%s) - start ))" >> $out/wall_time.txt
python eval.py --workdir=$wd > $out/eval_seed0.txt 2>/dev/null
cp $wd/test_metrics.json $out/test_metrics_seed0.json
cp $wd/metrics.jsonl $out/metrics_seed0.jsonl
cp $wd/config.json $out/config_seed0.json
cp $wd/eval/*.png $out/ 2>/dev/null || true
