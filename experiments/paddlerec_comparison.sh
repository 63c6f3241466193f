#!/usr/bin/env bash
# The runs behind the README's first table (PaddleRec's MultiMNIST data),
# one after another, each resumed where it stopped when run again:
#   1. configs/multimnist.py, seeds 0, 1, 2 (our recipe);
#   2. configs/paddlerec.py, 100 epochs (the like-for-like reproduction),
#      and its first 15 epochs alone (the same steps: a constant learning
#      rate), the reference of the ablations where the long run is missing;
#      paddlerec_30epochs (not in the default order): its first 30 epochs,
#      what one session's CPU affords of the long run;
#      timed_multimnist_seed0 (not in the default order): multimnist_seed0
#      again, alone on the CPU with the Toeplitz row kernels and freed
#      memory kept, for scripts/time_to_accuracy.py;
#      timed_direct_multimnist_seed0 (not in the default order): the same
#      with the kernels' direct convolutions (model.conv 'auto' since);
#      multimnist_100epochs_seed{0,1,2} (not in the default order): our
#      recipe with its schedule stretched to 100 epochs (warmup 1 epoch,
#      cosine to 0 at epoch 100), tested after every epoch, for the pooled
#      statistic PaddleRec reports;
#   3. one-factor ablations of configs/paddlerec.py, 15 epochs each, to set
#      beside its own first 15 epochs: the older data recipe, plain
#      cross-entropy, Flax's initializers.
#
#   bash experiments/paddlerec_comparison.sh RUNS_DIR [NAME ...]
#
# Checkpoints stay in RUNS_DIR/<name>; each finished run's config.json,
# run_info.json (the commits it ran on), metrics.jsonl (gzipped),
# test_metrics.json and console log are copied to
# results/paddlerec_comparison/<name>/. The raw MNIST files are read from
# $DSELECT_DATA_DIR (default: the cache, downloading when missing). With
# NAMEs, only those runs.
set -euo pipefail
cd "$(dirname "$0")/.."
runs_dir=${1:?usage: $0 RUNS_DIR [NAME ...]}
shift
out=results/paddlerec_comparison

declare -A ARGS=(
  [multimnist_seed0]="--config=configs/multimnist.py --config.seed=0"
  [multimnist_seed1]="--config=configs/multimnist.py --config.seed=1"
  [multimnist_seed2]="--config=configs/multimnist.py --config.seed=2"
  [timed_multimnist_seed0]="--config=configs/multimnist.py --config.seed=0"
  [timed_direct_multimnist_seed0]="--config=configs/multimnist.py --config.seed=0"
  [multimnist_100epochs_seed0]="--config=configs/multimnist.py --config.num_epochs=100 --config.seed=0"
  [multimnist_100epochs_seed1]="--config=configs/multimnist.py --config.num_epochs=100 --config.seed=1"
  [multimnist_100epochs_seed2]="--config=configs/multimnist.py --config.num_epochs=100 --config.seed=2"
  [paddlerec]="--config=configs/paddlerec.py"
  [paddlerec_15epochs]="--config=configs/paddlerec.py --config.num_epochs=15"
  [paddlerec_30epochs]="--config=configs/paddlerec.py --config.num_epochs=30"
  [ablation_paretomtl_axes]="--config=configs/paddlerec.py --config.num_epochs=15 --config.data.recipe=paretomtl_axes"
  [ablation_cross_entropy]="--config=configs/paddlerec.py --config.num_epochs=15 --config.loss.name=cross_entropy"
  [ablation_flax_init]="--config=configs/paddlerec.py --config.num_epochs=15 --config.model.init_scheme=flax"
)
ORDER=(multimnist_seed0 multimnist_seed1 multimnist_seed2 paddlerec_15epochs
       paddlerec ablation_paretomtl_axes ablation_cross_entropy ablation_flax_init)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")

for name in "${names[@]}"; do
  args=${ARGS[$name]:?unknown run $name}
  workdir=$runs_dir/$name
  mkdir -p "$workdir" "$out/$name"
  if [ -f "$out/$name/test_metrics.json" ]; then
    echo "$name: finished"; continue
  fi
  echo "python train.py $args --workdir=WORKDIR" > "$out/$name/command.txt"
  echo "$name: training ($(date -u +%FT%TZ))"
  # shellcheck disable=SC2086
  python train.py $args --workdir="$workdir" 2>&1 \
    | grep --line-buffered -v -e 'orbax' -e 'xla_bridge' >> "$workdir/train.log" || {
    echo "$name: stopped; run again to resume"; exit 1; }
  cp "$workdir/config.json" "$workdir/run_info.json" "$workdir/train.log" "$out/$name/"
  gzip -n -9 -c "$workdir/metrics.jsonl" > "$out/$name/metrics.jsonl.gz"
  cp "$workdir/test_metrics.json" "$out/$name/"
  echo "$name: done ($(date -u +%FT%TZ))"
done
