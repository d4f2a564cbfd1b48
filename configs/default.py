"""Every configuration key, its default and what it means.

Task configs import this and override. The defaults are the paper's common
settings (SPEC §10) with the ARC-AGI-1 optimiser settings. The returned
config is locked: a mistyped key in a file or a ``--config.key=value`` flag
fails, naming the key.
"""

import ml_collections


def parse_variant(arg: str | None, path: str, variants: tuple[str, ...] = (), default: str | None = None
                  ) -> tuple[str | None, str | None]:
  """A config file's ``:<variant>[,<arch>]`` (either part optional, any order) -> ``(variant, arch)``.

  ``arch`` is any registered architecture (``trm_jax.models``); the file
  then applies its paper settings with ``apply_arch``.
  """
  from trm_jax import models  # pylint: disable=g-import-not-at-top
  tokens = [t for t in (arg or "").split(",") if t]
  archs = [t for t in tokens if t in models.ARCHITECTURES]
  rest = [t for t in tokens if t not in models.ARCHITECTURES]
  if len(archs) > 1 or len(rest) > 1 or (rest and rest[0] not in variants):
    expected = f"one of {variants} and/or " if variants else ""
    raise ValueError(f"{path}: unknown variant {arg!r}; expected {expected}an architecture, one of "
                     f"{tuple(models.ARCHITECTURES)} (e.g. {path}:{','.join(variants[:1] + ('hrm',))})")
  return (rest[0] if rest else default), (archs[0] if archs else None)


def apply_arch(c: ml_collections.ConfigDict, arch: str | None, *, skip: tuple[str, ...] = ()) -> None:
  """Sets ``model.arch`` and the model fields its original config (``config/arch/<arch>.yaml``)
  sets differently from TRM's, except those in ``skip``."""
  if arch is None:
    return
  from trm_jax import models  # pylint: disable=g-import-not-at-top
  with c.unlocked():
    c.model.arch = arch
    for key, value in models.get(arch).paper_settings.items():
      if key not in skip:
        setattr(c.model, key, value)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  _, arch = parse_variant(arg, "configs/default.py")
  c = ml_collections.ConfigDict()

  # --- Data.
  c.data_path = ""  # dataset directory built by data_prep (holds train/ and test/); several, comma-separated, train as one
  c.test_data_path = ""  # directories whose test/ split evaluates (the original's data_paths_test); "": data_path's
  c.data_build = ""  # if data_path is missing, build it: "" (never), "sudoku", "maze" or "arc" (see trm_jax.datasets)
  c.data_build_args = ml_collections.ConfigDict()  # keyword arguments of that builder
  c.global_batch_size = 768  # examples per optimiser step, over all devices and hosts
  c.eval_batch_size = 0  # global batch size of evaluation; 0: global_batch_size
  c.num_workers = 0  # grain worker processes that read batches (0: in the main process)
  c.prefetch = 2  # batches read ahead of the training step
  c.cpu_keep_step_memory = True  # on a CPU: steps run inline and reuse freed memory, no page faults per step (trm_jax.cpu_runtime)

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
  c.init_weights = ""  # weights to start from: the original's torch.save checkpoint or an --mode=export .npz

  # --- Depth curriculum (trm_jax.curriculum; not in the original, off by default).
  # "HxL@fraction,...": train with H_cycles x L_cycles from that fraction of total_steps on, e.g.
  # "1x2@0,2x4@0.3,3x6@0.6" ("": model.H_cycles x model.L_cycles throughout; evaluation always uses them).
  c.depth_schedule = ""
  c.step_loss_decay = 1.0  # a sample's loss at supervision step t weighs decay^(t-1) (1.0: all equal, as the original)

  # --- Model (SPEC §1–§4; names as the original's arch config).
  m = c.model = ml_collections.ConfigDict()
  # The model (trm_jax.models): "trm", "trm_singlez", "trm_hier6", "hrm" or
  # "transformers_baseline" (SPEC §11); a config file's ":<arch>" also applies its paper settings.
  m.arch = "trm"
  m.hidden_size = 512  # D
  m.num_heads = 8  # attention heads; head dim hidden_size // num_heads (inner width num_heads * head dim)
  m.expansion = 4.0  # SwiGLU width factor
  m.L_layers = 2  # blocks of L_level (TRM's one network f)
  m.H_layers = 0  # blocks of H_level (hrm, transformers_baseline; unused by the TRM family)
  m.H_cycles = 3  # answer updates per supervision step (all but the last without gradient; baseline: unused)
  m.L_cycles = 6  # latent updates per answer update
  m.pos_encodings = "rope"  # "rope", "learned" or "none"
  m.rope_theta = 10000.0  # RoPE base
  m.rms_norm_eps = 1e-5  # RMSNorm epsilon
  m.puzzle_emb_ndim = m.get_ref("hidden_size")  # width of the puzzle embedding (0: none)
  m.puzzle_emb_len = 16  # prefix positions for it (0: ceil(puzzle_emb_ndim / hidden_size); hrm and the baseline always use that)
  m.mlp_t = False  # mix positions with an MLP instead of attention (Sudoku)
  m.halt_max_steps = 16  # supervision steps per sample at most
  m.halt_exploration_prob = 0.1  # chance of a random minimum number of steps in training
  m.no_ACT_continue = True  # TRM family: halt on q_halt > 0 only (False: on q_halt > q_continue, and learn
  # q_continue's target); hrm and the baseline always halt on q_halt > q_continue (SPEC §11)
  m.forward_dtype = "bfloat16"  # "bfloat16", "float32" or "float64" (reference mode, needs JAX_ENABLE_X64=1)
  m.loss_type = "stablemax_cross_entropy"  # or "softmax_cross_entropy"
  m.kernels = "xla"  # hot-path ops: "xla" or "pallas" (kernels/)
  m.remat = "none"  # recompute in the backward pass to save memory: "none", "attention" or "network"
  # Launch parameters of the Pallas kernels (trm_jax.ops; unused with kernels="xla"): tiles are powers
  # of two (>= 16 where a matmul uses them), num_warps a power of two, num_stages >= 1. They change how
  # an op runs, not what it computes (a resume may change them). `python -m trm_jax.bench_kernels
  # --sweep=small` prints the best ones for a config's shapes as overrides of these keys.
  kp = m.kernel_params = ml_collections.ConfigDict()
  a = kp.attention = ml_collections.ConfigDict()
  a.block_q = 64  # forward: query rows per program (the sequence is zero-padded to a multiple)
  a.block_k = 64  # forward: keys per step of the online softmax
  a.block_q_bwd = 64  # backward: query rows per step (dk/dv kernel) or per program (dq kernel)
  a.block_k_bwd = 64  # backward: keys per program (dk/dv kernel) or per step (dq kernel)
  a.num_warps = 4  # forward kernel
  a.num_stages = 3  # forward kernel
  a.num_warps_bwd = 8  # both backward kernels
  a.num_stages_bwd = 2  # both backward kernels
  r = kp.rms_norm = ml_collections.ConfigDict()  # residual + RMSNorm over channels (width D)
  r.block_rows = 0  # rows per program, a power of two (0: about 4096 elements per tile)
  r.num_warps = 4  # the forward and the backward kernel
  r.num_stages = 1  # the forward and the backward kernel
  kp.rms_norm_mlp_t = r.copy_and_resolve_references()  # the same keys, for mlp_t's norm over positions (S+P)
  g = kp.swiglu = ml_collections.ConfigDict()  # the channel SwiGLU (width D)
  g.block_rows = 64  # fused gate/up kernels: rows per program
  g.block_inter = 64  # fused gate/up kernels: intermediate columns per program
  g.block_width = 64  # fused gate/up kernels: step along D (the contraction)
  g.matmul_impl = "xla"  # the four plain matmuls: "xla" dots or "pallas" (the tiled kernel below)
  g.matmul_block_m = 128  # Pallas matmul tile: output rows
  g.matmul_block_n = 128  # Pallas matmul tile: output columns
  g.matmul_block_k = 32  # Pallas matmul tile: step along the contraction
  g.num_warps = 4  # forward gate/up kernel
  g.num_stages = 3  # forward gate/up kernel
  g.num_warps_bwd = 4  # backward gate/up kernel
  g.num_stages_bwd = 2  # backward gate/up kernel
  g.matmul_num_warps = 8  # Pallas matmul kernel
  g.matmul_num_stages = 3  # Pallas matmul kernel
  kp.swiglu_mlp_t = g.copy_and_resolve_references()  # the same keys, for mlp_t's SwiGLU over positions (S+P)

  # --- Evaluation (SPEC §9).
  # Extra evaluators (exact accuracy is always reported), one entry each: name -> {type, that type's keys}
  # (trm_jax.tasks; configs/arc.py and maze.py set theirs). Types: "arc" (pass_ks: pass@K reported;
  # submission_k: attempts per test input in submission.json; aggregated_voting: pool the votes of every
  # evaluation of a run, the original's default) and "maze" (no keys). Override e.g.
  # --config.evaluators.arc.pass_ks=1,2.
  c.evaluators = ml_collections.ConfigDict()
  c.best_metric = "all/exact_accuracy"  # evaluation metric that picks the best checkpoint
  c.best_mode = "max"  # "max" or "min"

  # --- Test-time training in --mode=predict (ARC; trm_jax.ttt): puzzles the run never saw train
  # their new embedding rows (and, by mode, the network) on their demonstration pairs before voting.
  # Not in the original. The defaults are for a Kaggle ARC Prize run: full fine-tuning for 12,500
  # steps is what reached 6.67% on ARC-AGI-2 semi-private within Kaggle's limits (arXiv 2511.02886),
  # stopped in time to vote within Kaggle's 12 h. steps=0: today's predict (blank embedding).
  t = c.ttt = ml_collections.ConfigDict()
  t.steps = 12500  # optimiser steps on the new puzzles' demonstration pairs (0: no test-time training)
  t.mode = "all"  # what trains: "embeddings" (new rows only, as freeze_weights), "all", "embeddings_then_all"
  t.switch_fraction = 0.5  # embeddings_then_all: fraction of the steps that train the embeddings only
  t.lr = 1e-4  # AdamATan2 lr of the dense parameters (the paper's ARC lr)
  t.puzzle_emb_lr = 1e-2  # SignSGD lr of the new embedding rows (the paper's ARC puzzle_emb_lr)
  t.warmup_steps = 100  # linear lr warmup of both (the dense one again after an embeddings_then_all switch)
  t.num_aug = 1000  # augmented versions per new puzzle, trained on and voted over (as the paper's datasets)
  t.batch_size = 0  # global batch of the test-time training steps (0: the run's global_batch_size)
  t.time_budget_s = 39600.0  # whole predict in seconds (11 h of Kaggle's 12): stops training in time to vote (0: none)

  # --- Evaluation beyond the original (trm_jax.test_time; issue #12). All off by default (the original's
  # evaluation); none is structural, so --mode=eval applies them to any checkpoint with --config.<key>=...
  c.eval_trajectories = 1  # K trajectories per test input (a batch axis); reports the one with the largest q_halt
  c.eval_noise_sigma = 0.0  # std of Gaussian noise on the latents before each supervision step (PTRM, arXiv 2605.19943)
  c.eval_noise_latents = ""  # comma-separated latents that get the noise (e.g. "z_L"); "": all of the architecture's
  c.eval_noise_seed = 0  # seed of the noise (folded with each input's content, trajectory, step and latent)
  c.eval_halt = False  # a row stops when its Q head says halt (answer frozen), the batch once all have
  c.eval_halt_max_steps = 0  # supervision steps at most in evaluation (0: model.halt_max_steps; may exceed it)

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
  apply_arch(c, arch)
  c.lock()
  return c
