#!/usr/bin/env bash
# The 100-epoch runs on this CPU, one after another, over as many sessions as
# they take: headline seed 0 (configs/multimnist.py), PaddleRec parity
# (configs/paddlerec.py, seed 0), then headline seeds 1 and 2. Parity goes
# second because its 5-epoch run is the one result below the seed's figures
# (README); the other seeds add error bars to the first. A run with a
# test_metrics.json is done and not trained again; any other resumes from
# its newest checkpoint, at the exact batch. A finished run is then
# evaluated once by eval.py (eval.txt, eval/: the best checkpoint's test
# results again, expert weights and training curves as PNGs). At low
# priority (nice 10), so that other work on the machine goes first. Stop it
# with SIGTERM to the train.py process: it saves a checkpoint at the
# current step.
# Run from the repository root, in the background:
#   nohup bash results/headline/run_cpu.sh > /dev/null 2>&1 &
# A session's end kills it, and the next session may start on a new machine
# with only what was committed (2026-12-02): before a session ends, run
# results/headline/stage_checkpoints.sh (it stops the run with SIGTERM and
# stages the newest and best checkpoints, otherwise git-ignored) and commit
# them with the rest of results/headline/runs/ (train.log, metrics.jsonl,
# config.json, tensorboard/); start this again in the next session.
set -uo pipefail
runs=results/headline/runs
data=${DATA_DIR:-../shared/data}
for name in multimnist_seed0 paddlerec_seed0 multimnist_seed1 \
            multimnist_seed2; do
  wd=$runs/$name
  if [[ -e $wd/test_metrics.json ]]; then
    [[ -e $wd/eval.txt ]] ||
      nice -n 10 python eval.py --workdir="$wd" > "$wd/eval.txt" 2>&1
    continue
  fi
  case $name in
    multimnist_seed*) cfg=configs/multimnist.py; seed=${name#multimnist_seed};;
    paddlerec_seed*) cfg=configs/paddlerec.py; seed=${name#paddlerec_seed};;
  esac
  mkdir -p "$wd"
  start=$(date +%s)
  nice -n 10 python train.py --config="$cfg" --workdir="$wd" \
    --config.seed="$seed" --config.data.data_dir="$data" \
    --config.data.download=False >> "$wd/train.log" 2>&1
  code=$?
  echo "$name exit $code wall_seconds $(( $(date +%s) - start ))" \
    "ended $(date -u +%FT%TZ)" >> "$runs/wall_time.txt"
  (( code == 0 )) || exit "$code"  # Stopped or failed: do not go on.
  nice -n 10 python eval.py --workdir="$wd" > "$wd/eval.txt" 2>&1
done
