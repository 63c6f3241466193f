#!/usr/bin/env bash
# At the end of a session: stop the CPU runs and stage, for the commit, the
# checkpoints a fresh checkout needs to resume them. Since 2026-12-02 a
# session may start on a new machine whose working tree holds only what was
# committed (that session found no checkpoints and the parity run began
# again from step 0), so the git-ignored checkpoints must be committed to
# carry a run over. For each run under results/headline/runs/:
#   - unfinished (no test_metrics.json): its newest periodic checkpoint and
#     its best one (the best is needed to pick the final checkpoint);
#   - finished: its best one only (eval.py can then test it on a fresh
#     clone: python eval.py --workdir=results/headline/runs/<run>).
# Checkpoints staged before and since deleted by Orbax are unstaged, so the
# commit holds only these (about 4 MB each; a best and a periodic checkpoint
# of the same step are written separately and share few files).
# Stopping: SIGTERM to each train.py of these runs, which saves a checkpoint
# at the current step and exits; run_cpu.sh then stops too.
# Run from the repository root, then commit:
#   bash results/headline/stage_checkpoints.sh && git commit -m ...
set -euo pipefail
runs=results/headline/runs

pattern="train.py .*--workdir=$runs/"
pids=$(pgrep -f "$pattern" || true)
if [[ -n $pids ]]; then
  echo "stopping train.py (pid $(echo $pids))"
  kill -TERM $pids
  for _ in $(seq 120); do
    pgrep -f "$pattern" > /dev/null || break
    sleep 1
  done
  if pgrep -f "$pattern" > /dev/null; then
    echo "train.py still running after 120 s; not staging" >&2
    exit 1
  fi
fi

for wd in "$runs"/*/; do
  wd=${wd%/}
  [[ -d $wd/checkpoints || -d $wd/best ]] || continue
  git rm -r -q --cached --ignore-unmatch -- "$wd/checkpoints" "$wd/best"
  keep=()
  if [[ -d $wd/best ]]; then keep+=("$wd/best"); fi
  if [[ ! -e $wd/test_metrics.json && -d $wd/checkpoints ]]; then
    newest=$(ls "$wd/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)
    [[ -n $newest ]] && keep+=("$wd/checkpoints/$newest")
  fi
  if (( ${#keep[@]} )); then
    git add -f -- "${keep[@]}"
    echo "$wd: staged ${keep[*]#$wd/}"
  fi
done
