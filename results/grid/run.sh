#!/usr/bin/env bash
# The gate comparison, in the order this CPU could afford it: every call is
# the same grid command restricted to some cells; finished cells are skipped
# and a stopped cell resumes from its checkpoint, so re-running this script
# (on any machine, or split with --shard=i/n) continues the grid.
# Run from the repository root: bash results/grid/run.sh > results/grid/run.log 2>&1
set -uo pipefail
grid() {
  python experiments/grid.py --out=results/grid \
    --set=data.data_dir=../shared/data "$@"
}
grid --gates=dselect_k --seeds=0
grid --gates=softmax,top_k,dselect_k_per_example --seeds=0
grid --gates=dselect_k --seeds=1,2
grid --gates=top_k --seeds=1,2
grid --gates=dselect_k,top_k --datasets=multi_fashion,multi_fashion_mnist --seeds=0
grid --seeds=0,1,2
# Beyond the minimum (the Multi-(Fashion+MNIST) cells of this call did not
# run yet; the same line resumes them):
grid --gates=dselect_k,top_k --datasets=multi_fashion,multi_fashion_mnist --seeds=1
