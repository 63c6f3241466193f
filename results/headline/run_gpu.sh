#!/usr/bin/env bash
# The 100-epoch runs on one GPU, in one sitting of at most TOTAL seconds:
#   1. the headline, configs/multimnist.py with seeds 0, 1, 2, and PaddleRec
#      parity, configs/paddlerec.py with seed 0 (PARITY=0 leaves it out):
#      concurrent train.py processes sharing the GPU, with the expert
#      implementation IMPL (default loop). A run still going at the deadline
#      gets SIGTERM: it saves a checkpoint and exits, and the same command
#      with the same RUNS resumes it (with the expert implementation of its
#      checkpoints);
#   2. with the time the runs leave (a minute or more),
#      benchmarks/train_speed.py at batch 256 on the GPU (ours: each expert
#      implementation; PyTorch eager on CUDA), into RUNS/train_speed_gpu.md.
# With PACK_DIR, each run folder (its best and newest checkpoints, logs and
# metrics) is also packed into PACK_DIR/<run>.tgz, the rest into misc.tgz.
# Run from the repository root (on the lent GPU, through device.sh beside this):
#   bash results/headline/run_gpu.sh DATA_DIR RUNS_DIR TOTAL_SECONDS [PACK_DIR]
# A dry run on a CPU, through device.sh: EXTRA='--config.num_train_steps=2'
# BENCH_STEPS=1 BENCH_IMPLS=loop TORCH_DEVICE=cpu bash
# results/headline/device.sh /tmp/out 300
set -uo pipefail
data=${1:?data dir with mnist/}; runs=${2:?runs dir}; total=${3:-540}
pack=${4:-}
start=$(date +%s)
left() { echo $(( start + total - $(date +%s) )); }
mkdir -p "$runs"
export PYTHONUNBUFFERED=1

echo "== $(date -u) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c 'import jax, flax, optax, orbax.checkpoint as o, ml_collections
print("jax", jax.__version__, "flax", flax.__version__, "optax",
      optax.__version__, "orbax", o.__version__, jax.devices())' || exit 1

# The runs come first; the benchmark gets what time they leave. PARITY=0
# leaves the parity run out. A run with a test_metrics.json, here or in the
# repository's results/headline/runs/ (finished on the CPU), is done.
runs_list=""
for name in multimnist_seed0 multimnist_seed1 multimnist_seed2 \
            paddlerec_seed0; do
  [[ $name == paddlerec_* && ${PARITY:-1} == 0 ]] && continue
  if [[ -e $runs/$name/test_metrics.json ||
        -e results/headline/runs/$name/test_metrics.json ]]; then
    echo "== $name: finished, skipped"; continue
  fi
  runs_list="$runs_list $name"
done
# Resumed runs keep the parameter layout of their checkpoints; new runs use
# IMPL (default 'loop': one module per expert; with model.conv='auto' its
# convolutions are XLA's on a GPU).
prev=$(for name in $runs_list; do
  [[ -e $runs/$name/config.json ]] && python -c 'import json, sys
print(json.load(open(sys.argv[1]))["model"]["expert_impl"])' \
    "$runs/$name/config.json" 2>/dev/null && break
done)
impl=${prev:-${IMPL:-loop}}
budget=$(( $(left) - 60 ))
(( budget > 60 )) || { echo "no time left to train ($budget s)"; exit 1; }
echo "== training: experts $impl;$runs_list; $budget s budget"

for name in $runs_list; do
  case $name in
    multimnist_seed*) cfg=configs/multimnist.py; seed=${name#multimnist_seed};;
    paddlerec_seed*) cfg=configs/paddlerec.py; seed=${name#paddlerec_seed};;
  esac
  mkdir -p "$runs/$name"
  ( s=$(date +%s)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 timeout -s TERM -k 20 "$budget" \
      python train.py --config="$cfg" --workdir="$runs/$name" \
      --config.seed="$seed" --config.data.data_dir="$data" \
      --config.data.download=False --config.model.expert_impl="$impl" \
      ${EXTRA:-} >> "$runs/$name/train.log" 2>&1
    echo "$name exit $? wall_seconds $(( $(date +%s) - s ))" \
      >> "$runs/wall_time.txt" ) &
done
wait
cat "$runs/wall_time.txt"
for name in $runs_list; do
  echo "== $name"; grep -E 'validation at|test \(|error|stopped' \
    "$runs/$name/train.log" | tail -3
done

bench=$(( $(left) - 45 ))
if (( bench >= 60 )); then
  echo "== benchmark ($bench s)"
  timeout -k 5 "$bench" python benchmarks/train_speed.py --batches=256 \
    --steps="${BENCH_STEPS:-100}" --repeats=3 \
    --impls="${BENCH_IMPLS:-loop,fused_grouped,fused_patches}" --convs=xla \
    --norms=xla \
    --torch_device="${TORCH_DEVICE:-cuda}" --out="$runs/train_speed_gpu.md" \
    > "$runs/train_speed_gpu.log" 2>&1
  grep '^|' "$runs/train_speed_gpu.log" | tail -5
else
  echo "== no time left for the benchmark ($bench s)"
fi

if [[ -n $pack ]]; then
  mkdir -p "$pack"
  for name in $runs_list; do
    old=$(ls "$runs/$name/checkpoints" 2>/dev/null | sort -n | head -n -1)
    tar czf "$pack/$name.tgz" -C "$runs" \
      $(for s in $old; do echo "--exclude=$name/checkpoints/$s"; done) "$name"
  done
  tar czf "$pack/misc.tgz" -C "$runs" --exclude='*_seed*' .
  ls -la "$pack"
fi
