"""Every configuration key, its default and what it means.

Task configs import this and override. The defaults are the paper's common
settings (SPEC §10) with the ARC-AGI-1 optimiser settings. The returned
config is locked: a mistyped key in a file or a ``--config.key=value`` flag
fails, naming the key.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # no variants
  c = ml_collections.ConfigDict()

  # --- Data.
  c.data_path = ""  # dataset directory built by data_prep (holds train/ and test/)
  c.data_build = ""  # if data_path is missing, build it: "" (never), "sudoku", "maze" or "arc" (see trm_jax.datasets)
  c.data_build_args = ml_collections.ConfigDict()  # keyword arguments of that builder
  c.global_batch_size = 768  # examples per optimiser step, over all devices and hosts
  c.eval_batch_size = 0  # global batch size of evaluation; 0: global_batch_size
  c.num_workers = 0  # grain worker processes that read batches (0: in the main process)
  c.prefetch = 2  # batches read ahead of the training step

  # --- Schedule (SPEC §6).
  c.epochs = 100000  # passes over the training groups
  c.eval_interval = 10000  # epochs between evaluations; must divide epochs
  c.min_eval_interval = 0  # first iteration (in units of eval_interval) that evaluates
  c.max_steps = 0  # stop after this many optimiser steps (0: the whole schedule); does not change the lr schedule
  c.seed = 0  # parameters, ACT exploration and data order

  # --- Optimisers (SPEC §6).
  c.lr = 1e-4  # AdamATan2 learning rate of the dense parameters
  c.lr_min_ratio = 1.0  # cosine decay to lr * lr_min_ratio (1.0: constant after warmup)
  c.lr_warmup_steps = 2000  # linear warmup from 0
  c.beta1 = 0.9  # AdamATan2 first-moment decay
  c.beta2 = 0.95  # AdamATan2 second-moment decay
  c.weight_decay = 0.1  # decoupled weight decay of the dense parameters
  c.puzzle_emb_lr = 1e-2  # sparse SignSGD learning rate of the puzzle embedding
  c.puzzle_emb_weight_decay = 0.1  # decay of the puzzle-embedding rows in the batch
  c.grad_clip_norm = 0.0  # clip dense gradients to this global norm (0: off, as the original)
  c.ema = False  # keep an EMA of the dense parameters, used for evaluation and export
  c.ema_rate = 0.999  # EMA decay per step
  c.freeze_weights = False  # train only the puzzle embedding
  c.init_weights = ""  # .npz of original-named weights (e.g. from the PyTorch code) to start from

  # --- Model (SPEC §1–§4; names as the original's arch config).
  m = c.model = ml_collections.ConfigDict()
  m.hidden_size = 512  # D
  m.num_heads = 8  # attention heads (hidden_size must divide by it)
  m.expansion = 4.0  # SwiGLU width factor
  m.L_layers = 2  # blocks in the one network f
  m.H_layers = 0  # unused by TRM; kept for parity with the original's configs
  m.H_cycles = 3  # answer updates per supervision step (all but the last without gradient)
  m.L_cycles = 6  # latent updates per answer update
  m.pos_encodings = "rope"  # "rope", "learned" or "none"
  m.rope_theta = 10000.0  # RoPE base
  m.rms_norm_eps = 1e-5  # RMSNorm epsilon
  m.puzzle_emb_ndim = m.get_ref("hidden_size")  # width of the puzzle embedding (0: none)
  m.puzzle_emb_len = 16  # prefix positions for it (0: ceil(puzzle_emb_ndim / hidden_size))
  m.mlp_t = False  # mix positions with an MLP instead of attention (Sudoku)
  m.halt_max_steps = 16  # supervision steps per sample at most
  m.halt_exploration_prob = 0.1  # chance of a random minimum number of steps in training
  m.no_ACT_continue = True  # halt on q_halt > 0 only (no Q-learning continue target)
  m.forward_dtype = "bfloat16"  # "bfloat16" or "float32" activations and carry
  m.loss_type = "stablemax_cross_entropy"  # or "softmax_cross_entropy"
  m.kernels = "xla"  # hot-path ops: "xla" or "pallas" (kernels/)
  m.remat = "none"  # recompute in the backward pass to save memory: "none", "attention" or "network"

  # --- Evaluation (SPEC §9).
  c.evaluators = ""  # comma-separated extra evaluators: "arc", "maze" (exact accuracy is always reported)
  c.arc_pass_ks = (1, 2, 5, 10, 100, 1000)  # ARC pass@K reported
  c.arc_submission_k = 2  # attempts per test input in submission.json
  c.arc_aggregated_voting = True  # pool ARC votes over every evaluation of a run (the original's default)
  c.best_metric = "all/exact_accuracy"  # evaluation metric that picks the best checkpoint
  c.best_mode = "max"  # "max" or "min"

  # --- Checkpoints (Orbax, in <workdir>/checkpoints and <workdir>/best).
  c.keep_checkpoints = 2  # latest checkpoints kept
  c.keep_best = True  # also keep the best checkpoint by best_metric
  c.checkpoint_every_steps = 0  # also save every N steps (0: only after each evaluation and at exit)
  c.resume_allow_changes = ""  # model keys a resume may change on purpose ("model.H_cycles,..."); others refuse

  # --- Logging.
  c.log_every_steps = 50  # steps between progress lines and TensorBoard scalars
  c.tensorboard = True  # write <workdir>/tensorboard event files (process 0)
  c.num_image_samples = 4  # predictions drawn to TensorBoard at each evaluation

  # --- Devices (trm_jax.sharding).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # -1: the remaining devices
  c.param_sharding = "replicated"  # dense params: "replicated", "fsdp" or "fsdp_model"
  c.lock()
  return c
