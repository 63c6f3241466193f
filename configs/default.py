"""Defaults shared by every config: the reference recipe's model and optimizer.

Not meant to be run by itself; the data-set configs import it and override a
few fields. Every field is documented here once.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  # 'multi_mnist', 'multi_fashion', 'multi_fashion_mnist',
  # 'multi_mnist_sample' (shipped, no download), 'paddlerec' (images), or
  # 'movielens' (MovieLens-100K: watch and rating; configs/movielens.py).
  config.data.name = 'multi_mnist'
  # 'comet' (100k/20k/20k, fixed positions), 'paretomtl' (Pareto MTL's and
  # PaddleRec's data: 16 diagonal shifts) or 'paretomtl_axes' (an older
  # guess at it: 625 shifts); see dselect_jax/datasets/multimnist.py.
  config.data.recipe = 'comet'
  # Seed of the pairing and offsets; the data are a function of it.
  config.data.seed = 0
  # Folder with mnist/ and fashion_mnist/; '' means $DSELECT_DATA_DIR, else
  # ~/.cache/dselect_jax (downloaded there when missing).
  config.data.data_dir = ''
  # Folder of PaddleRec's train.pickle/test.pickle (data.name='paddlerec').
  config.data.paddlerec_dir = ''
  # Download missing raw files from the public mirrors.
  config.data.download = True
  # Train composites held out for validation (paretomtl: the last ones of the
  # 120,000; 0 leaves no validation split, and the last checkpoint is
  # tested); -1: the recipe's default (paretomtl 20,000, paretomtl_axes
  # 5,000 bases x 2, comet always 10,000 bases x 2).
  config.data.num_validation = -1
  # Shuffle the train split every epoch (False: stored order, as PaddleRec).
  config.data.shuffle = True
  # New train composites every epoch: the same top-left images re-paired
  # with new partners and placements (datasets.multimnist.FreshTrainSplits);
  # validation and test stay fixed. Built data sets only.
  config.data.fresh_train = False
  # Unrated movies drawn per rating as the watch task's negatives
  # (movielens only).
  config.data.negatives = 1

  config.model = ml_collections.ConfigDict()
  # E, the shared experts (the MultiMNIST CNN of PaddleRec's model).
  config.model.num_experts = 8
  # One gate for all tasks (PaddleRec) instead of one gate per task (paper).
  config.model.shared_gate = False
  # How the experts compute their convolutions: 'xla' (XLA's
  # convolution), 'toeplitz' (row matmuls, cpu.ToeplitzConv; faster than
  # 'xla' on XLA:CPU), 'kernel' (summed directly by hand-written CPU
  # kernels, forward and backward, cpu.DirectConv), or 'auto' (on CPU,
  # kernel where the kernels build and measure faster than toeplitz on this
  # machine, cpu/calibrate.py, else toeplitz; xla elsewhere). Same
  # parameters either way: a checkpoint trained with one evaluates with the
  # other.
  config.model.conv = 'auto'
  # How the experts compute each BatchNorm-ReLU-pool block: 'xla'
  # (nn.BatchNorm, nn.relu, blocks.max_pool_2x2), 'kernel' (hand-written CPU
  # kernels, cpu.BatchNormReLUPool; faster on CPU, built on first use
  # with the system's C++ compiler), or 'auto' (kernel on CPU if it builds,
  # else xla). Same parameters either way, as for conv.
  config.model.norm = 'auto'
  # How the experts are laid out: 'loop' (one module per expert, variables
  # experts/expert_<e>/...) or 'vmap' (one nn.vmap over the experts,
  # variables stacked on a leading expert axis; XLA's ops only, so conv and
  # norm 'auto' resolve to xla; meant for GPUs, not yet run on one). The same
  # function: experts.stack_expert_variables converts the loop's variables.
  config.model.expert_bank = 'loop'
  # Evaluate only the experts some static gate still weighs (same logits as
  # computing all of them; faster once the gates have converged).
  config.model.sparse_eval = True
  # Train only the experts some static gate still weighs (checked at every
  # log step); exact for adam and sgd, see steps.SparseTrainSteps.
  config.model.sparse_train = False
  # Per-example gates: compute each expert only on the examples some task
  # weighs it for (steps.Dispatcher; exact, and kept only where it timed
  # faster than the dense step), in training and evaluation. In training
  # the CNN experts' BatchNorm then normalizes over each expert's routed
  # examples on each device (models.MultiTaskMoE.routed_statistics), in
  # every step: the device's whole batch until the gates saturate. It needs
  # per-example gates, so it is off here and on in the per-example recipes
  # (configs/movielens_experts64.py, configs/multimnist_experts16.py;
  # results/benchmarks/dispatch_speed_*.md).
  config.model.sparse_dispatch = False
  # Evaluate the loop's experts as one computation (models.
  # multimnist_experts_eval: BatchNorm folded into the convolutions, the
  # first convolution of all experts as one; with the CPU kernels'
  # convolutions, model.conv 'kernel', each
  # convolution-ReLU-pool block in one kernel, cpu.kernels.conv_relu_pool):
  # the same function up to float rounding, faster (docs/performance.md).
  # Training is unchanged; the vmap bank ignores it.
  config.model.fused_eval = True
  # What a per-example gate routes on: 'input' (pixels) or 'experts' (mean
  # expert output).
  config.model.routing_input = 'input'
  # Initializers: 'flax' (Flax's defaults; DSelect-k's as the paper's
  # layer) or 'paddlerec' (PaddleRec's: Xavier-normal convolutions,
  # truncated-normal dense layers, DSelect-k weight logits U(-1, 1)).
  config.model.init_scheme = 'flax'
  # The feature data sets' model (movielens; models.RecommenderMoE): the
  # width of every categorical feature's embedding, each MLP expert's hidden
  # layer and output (H), and each task tower's hidden layer.
  config.model.embed_dim = 8
  config.model.expert_hidden = 64
  config.model.expert_features = 32
  config.model.tower_hidden = 32

  config.model.gate = ml_collections.ConfigDict()
  # 'dselect_k', 'softmax' (MMoE) or 'top_k' (Shazeer et al. 2017).
  config.model.gate.name = 'dselect_k'
  # Experts each task ends up with (dselect_k, top_k).
  config.model.gate.k = 2
  # Width of DSelect-k's smooth-step region (dselect_k).
  config.model.gate.gamma = 1.0
  # Route per example from routing_input instead of one weight vector per task.
  config.model.gate.per_example = False
  # Tunable Gaussian noise while training (top_k).
  config.model.gate.noisy = True

  config.optimizer = ml_collections.ConfigDict()
  # 'adam', 'adamw' or 'sgd' (with momentum).
  config.optimizer.name = 'adam'
  # Peak learning rate.
  config.optimizer.learning_rate = 1e-3
  # Decoupled weight decay (adamw only).
  config.optimizer.weight_decay = 1e-4
  # Momentum (sgd only).
  config.optimizer.momentum = 0.9
  # Clip gradients to this global norm; 0 disables clipping.
  config.optimizer.grad_clip_norm = 0.0

  config.schedule = ml_collections.ConfigDict()
  # 'constant' or 'warmup_cosine' (linear warmup, cosine decay to 0).
  config.schedule.name = 'constant'
  # Linear warmup steps (warmup_cosine).
  config.schedule.warmup_steps = 0

  config.loss = ml_collections.ConfigDict()
  # Task loss: 'cross_entropy' (softmax cross-entropy of the logits) or
  # 'double_softmax' (PaddleRec's: cross-entropy applied to softmax output,
  # steps.task_losses).
  config.loss.name = 'cross_entropy'
  # Label smoothing of the cross-entropy (0: none).
  config.loss.label_smoothing = 0.0
  # Weight of DSelect-k's entropy term (Section 4); it is ramped linearly from
  # 0 at entropy_start_step to this value entropy_ramp_steps later.
  config.loss.entropy_weight = 0.0
  config.loss.entropy_start_step = 0
  config.loss.entropy_ramp_steps = 0
  # Weight of DSelect-k's reachability term (1 in the original layer; it is 0
  # anyway when num_experts is a power of two).
  config.loss.reachability_weight = 1.0
  # Weights of the top-k gate's importance and load terms.
  config.loss.importance_weight = 0.0
  config.loss.load_weight = 0.0

  # Global batch, split over all local devices.
  config.batch_size = 256
  # Batch for validation and test (the last one is padded and masked).
  config.eval_batch_size = 1000
  # Training length in epochs of the train split; num_train_steps > 0 wins.
  config.num_epochs = 100
  config.num_train_steps = -1
  # Console and metrics-file cadence, in steps.
  config.log_every_steps = 50
  # Validation cadence in steps; -1 means once per epoch.
  config.eval_every_steps = -1
  # Checkpoint cadence in steps; -1 means at every validation.
  config.checkpoint_every_steps = -1
  # Periodic checkpoints kept for resuming (the best one is kept apart).
  config.max_to_keep = 2
  # Also evaluate the test split after every epoch, for the statistics in
  # test_metrics.json (the pooled mean over epochs is PaddleRec's figure).
  config.test_every_epoch = False
  # Seed of initialization, shuffling and gate noise.
  config.seed = 0
  return config
