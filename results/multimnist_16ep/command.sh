#!/usr/bin/env bash
# The reference recipe (configs/multimnist.py) shortened to 16 epochs with a
# warmup + cosine learning rate, to fit a working session on a 2-core CPU.
set -euo pipefail
python train.py --config=configs/multimnist.py --workdir=workdirs/multimnist_16ep \
  --config.num_epochs=16 --config.schedule.name=warmup_cosine \
  --config.schedule.warmup_steps=300 --config.data.data_dir=../shared/data
python eval.py --workdir=workdirs/multimnist_16ep
