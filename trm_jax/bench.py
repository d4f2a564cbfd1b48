r"""Times the jitted train and eval steps of a config on random data.

  python -m trm_jax.bench --config=configs/arc.py [--config.key=value ...] \
      [--batch_per_device=N | --find_max_batch] [--steps=20]

Compiles both steps, then times them, and prints one JSON line: steps/s
(the mean of a loop, then the min and median of as many steps each waited
for), tokens/s, analytic FLOPs per step and the FLOP rate, model FLOP
utilisation against the device's peak, peak device memory and compile times.
Where no peak is known (CPUs), ``--matmul_peak`` times a large square matmul
instead and reports the step's rate as a fraction of it. The dataset is not read:
sequence length, vocabulary and the number of puzzle identifiers come from the
dataset's metadata when ``data_path`` exists, else from the flags.

``--find_max_batch`` first searches the largest per-device batch whose
compiled train step fits in device memory (XLA's buffer assignment, read from
compiles on abstract inputs: nothing is allocated), then times that batch,
stepping down if it still runs out of memory.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

FLAGS = flags.FLAGS

# Dense bf16 tensor-core peaks (FLOP/s), by device kind; float32 runs use the
# same number (an upper bound: the MFU is then conservative).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: jax.Device) -> float | None:
  kind = device.device_kind
  for name, peak in PEAK_FLOPS.items():
    if name in kind:
      return peak
  return None


def block_flops(model, batch: int) -> float:
  """Forward matmul FLOPs of one block (every level's blocks have the same shape)."""
  from trm_jax.models import layers  # pylint: disable=g-import-not-at-top
  length, dim = model.num_positions, model.hidden_size
  inter = layers.swiglu_intermediate_size(dim, model.expansion)
  flops = 2 * batch * length * dim * 2 * inter + 2 * batch * length * inter * dim  # channel SwiGLU
  if model.mlp_t:
    inter_t = layers.swiglu_intermediate_size(length, model.expansion)
    flops += 2 * batch * dim * length * 2 * inter_t + 2 * batch * dim * inter_t * length
  else:
    attn = model.num_heads * model.head_dim  # the attention's inner width
    flops += 2 * batch * length * dim * 3 * attn + 2 * batch * length * attn * dim  # qkv, o
    flops += 2 * 2 * batch * length * length * attn  # scores and weighted sum
  return flops


def step_flops(model, batch: int) -> dict[str, float]:
  """Analytic FLOPs of one ACT call: forward everywhere, backward through the graded blocks.

  The architecture says how many blocks a step applies, and how many of them
  with gradient (``block_calls``). ``train`` counts the model's FLOPs (what
  MFU divides); ``train_recomputed`` what ``model.remat`` adds on top by
  recomputing the graded blocks' forward (all of them for "network", the
  attention scores and weighted sum for "attention"), for the hardware FLOP
  utilisation.
  """
  from trm_jax import models  # pylint: disable=g-import-not-at-top
  arch = models.of(model)
  block = block_flops(model, batch)
  all_blocks, graded_blocks = arch.block_calls(model)
  heads = 2 * batch * model.seq_len * model.hidden_size * model.vocab_size + 2 * batch * model.hidden_size * 2
  forward = all_blocks * block + heads
  backward = 2 * (graded_blocks * block + heads)
  train = forward + backward
  if arch.q_continue_target(model):
    train += forward  # the target's extra forward
  recomputed = 0
  if model.remat == "network":
    recomputed = graded_blocks * block
  elif model.remat == "attention" and not model.mlp_t:
    length = model.num_positions
    recomputed = graded_blocks * 2 * 2 * batch * length * length * model.num_heads * model.head_dim
  return {"train": float(train), "train_recomputed": float(recomputed), "eval_call": float(forward)}


def _time(fn, n: int) -> float:
  start = time.perf_counter()
  out = None
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / n


def _blocked_times(fn, n: int) -> list[float]:
  """Seconds of each of ``n`` calls, each waited for: the spread a mean hides on a shared machine."""
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def matmul_flops_per_s(dtype: str, size: int = 0, repeats: int = 5) -> dict[str, Any]:
  """The best rate of a ``size`` x ``size`` matmul in ``dtype`` on the first device.

  An empirical ceiling for the step's FLOP rate where no peak is known (CPUs);
  ``size`` 0 picks 2048 on a CPU, 8192 elsewhere.
  """
  device = jax.devices()[0]
  size = size or (2048 if device.platform == "cpu" else 8192)
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
  jax.block_until_ready(matmul(a, a))
  best = min(_blocked_times(lambda: matmul(a, a), repeats))
  return {"matmul_size": size, "matmul_dtype": str(a.dtype), "matmul_flops_per_s": 2 * size**3 / best}


def _minor_faults() -> int:
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # not on Windows
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclasses.dataclass
class _Setup:
  """What both the timing and the memory search need, for one global batch."""
  model: Any
  mesh: Any
  global_batch: int
  seq_len: int
  vocab_size: int
  num_ids: int
  create_state: Callable
  state_sh: Any
  batch_sh: Any
  carry_sh: Any
  abstract_batch: dict
  train_step: Any  # jitted, with shardings and donation


def model_for(config, *, seq_len: int = 0, vocab_size: int = 0, num_puzzle_identifiers: int = 0):
  """The model config the benchmarks time: the dataset's sizes when ``data_path``
  holds one, else the given ones (0: ARC's 900 tokens, vocabulary 12, 1000 ids)."""
  from trm_jax import dataset_format  # pylint: disable=g-import-not-at-top
  from trm_jax import runs  # pylint: disable=g-import-not-at-top
  split = pathlib.Path(config.data_path) / "train"
  if config.data_path and (split / dataset_format.METADATA_FILE).is_file():
    meta = dataset_format.load_split(split).metadata
    seq_len, vocab_size, num_ids = meta.seq_len, meta.vocab_size, meta.num_puzzle_identifiers
  else:
    seq_len, vocab_size, num_ids = seq_len or 900, vocab_size or 12, num_puzzle_identifiers or 1000
  metadata = dataset_format.DatasetMetadata(
      seq_len=seq_len, vocab_size=vocab_size, pad_id=0, ignore_label_id=0, blank_identifier_id=0,
      num_puzzle_identifiers=num_ids, total_groups=1, mean_puzzle_examples=1.0, total_puzzles=1, sets=["all"])
  return runs.model_config(config, metadata)


def _setup(config, *, batch_per_device: int = 0, seq_len: int = 0, vocab_size: int = 0,
           num_puzzle_identifiers: int = 0) -> _Setup:
  from trm_jax import act, optim, sharding, state as state_lib, steps  # pylint: disable=g-import-not-at-top

  model = model_for(config, seq_len=seq_len, vocab_size=vocab_size, num_puzzle_identifiers=num_puzzle_identifiers)
  seq_len, vocab_size, num_ids = model.seq_len, model.vocab_size, model.num_puzzle_identifiers
  mesh = sharding.make_mesh(sharding.MeshShape(**config.mesh.to_dict()))
  global_batch = batch_per_device * mesh.size if batch_per_device else config.global_batch_size
  sharding.check_global_batch_size(global_batch, mesh)
  optimizers = optim.make_optimizers(
      lr=config.lr, weight_decay=config.weight_decay, puzzle_emb_lr=config.puzzle_emb_lr,
      puzzle_emb_weight_decay=config.puzzle_emb_weight_decay, beta1=config.beta1, beta2=config.beta2,
      warmup_steps=config.lr_warmup_steps, total_steps=10**6, lr_min_ratio=config.lr_min_ratio,
      trainable_mask=state_lib.trainable_mask)
  rows = sharding.padded_table_rows(num_ids, mesh)
  create = lambda: state_lib.create_train_state(model, optimizers, 0, ema=config.ema, puzzle_emb_rows=rows)
  state_sh = sharding.state_shardings(jax.eval_shape(create), mesh, config.param_sharding)
  batch_sh = sharding.batch_sharding(mesh)
  abstract_batch = {"inputs": jax.ShapeDtypeStruct((global_batch, seq_len), np.int32),
                    "labels": jax.ShapeDtypeStruct((global_batch, seq_len), np.int32),
                    "puzzle_identifiers": jax.ShapeDtypeStruct((global_batch,), np.int32)}
  carry_sh = sharding.carry_shardings(jax.eval_shape(lambda b: act.initial_carry(model, b), abstract_batch),
                                      mesh)
  train_step = jax.jit(
      steps.make_train_step(model, optimizers, global_batch, config.ema_rate if config.ema else None),
      in_shardings=(state_sh, carry_sh, batch_sh),
      out_shardings=(state_sh, carry_sh, sharding.replicated(mesh)), donate_argnums=(0, 1))
  return _Setup(model, mesh, global_batch, seq_len, vocab_size, num_ids, create, state_sh, batch_sh, carry_sh,
                abstract_batch, train_step)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def train_step_memory(config, batch_per_device: int, **dims) -> int:
  """Device bytes the compiled train step needs at ``batch_per_device``.

  Compiles on abstract inputs (nothing is allocated) and adds XLA's buffer
  assignment: arguments + outputs + temporaries - donated (aliased) bytes.
  """
  from trm_jax import act  # pylint: disable=g-import-not-at-top
  setup = _setup(config, batch_per_device=batch_per_device, **dims)
  state = _abstract(jax.eval_shape(setup.create_state), setup.state_sh)
  batch = _abstract(setup.abstract_batch, {k: setup.batch_sh for k in setup.abstract_batch})
  carry = _abstract(jax.eval_shape(lambda b: act.initial_carry(setup.model, b), setup.abstract_batch),
                    setup.carry_sh)
  analysis = setup.train_step.lower(state, carry, batch).compile().memory_analysis()
  if analysis is None:
    raise ValueError("this backend reports no memory analysis of compiled programs; pass --batch_per_device")
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
             - analysis.alias_size_in_bytes)


def device_memory_limit() -> int | None:
  """Bytes the first device's allocator may hand out (None where unknown, as on a CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def find_max_batch(config, memory_limit: int, *, granularity: int = 8, log=lambda msg: None,
                   **dims) -> tuple[int, list[dict]]:
  """The largest multiple of ``granularity`` per device whose train step fits in ``memory_limit`` bytes.

  Memory grows about linearly with the batch: two compiles give the line, the
  next checks its prediction, stepping down by the bytes it overshot until one
  fits, then up while the next multiple still fits (so the answer is the
  largest, not just one that fits). Returns the batch and every probe made,
  as {batch_per_device, bytes} rows.
  """
  probes = []
  measured: dict[int, int] = {}

  def fits(batch: int) -> bool:
    if batch not in measured:
      measured[batch] = train_step_memory(config, batch, **dims)
      probes.append({"batch_per_device": batch, "bytes": measured[batch]})
      log(f"batch_per_device={batch}: {measured[batch] / 2**30:.3f} GiB of {memory_limit / 2**30:.3f} GiB")
    return measured[batch] <= memory_limit

  low, high = granularity, 2 * granularity
  if not fits(low):
    raise ValueError(f"batch_per_device={low} already needs {measured[low] / 2**30:.2f} GiB, more than the "
                     f"{memory_limit / 2**30:.2f} GiB limit")
  fits(high)
  per_example = max((measured[high] - measured[low]) / (high - low), 1.0)
  fixed = measured[low] - per_example * low
  best = high if measured[high] <= memory_limit else low
  guess = int((memory_limit - fixed) / per_example) // granularity * granularity
  for _ in range(6):  # down from the prediction until one fits
    if guess <= best:
      break
    if fits(guess):
      best = guess
      break
    overshoot = (measured[guess] - memory_limit) / per_example
    guess -= max(1, int(np.ceil(overshoot / granularity))) * granularity
  for _ in range(6):  # then up while the next one fits too
    if not fits(best + granularity):
      break
    best += granularity
  return best, probes


def benchmark(config, *, batch_per_device: int = 0, num_steps: int = 10, eval_steps: int = 2,
              seq_len: int = 0, vocab_size: int = 0, num_puzzle_identifiers: int = 0,
              skip_eval: bool = False, profile_dir: str = "", profile_steps: int = 2,
              matmul_peak: bool = False) -> dict:
  from trm_jax import act, cpu_runtime, steps  # pylint: disable=g-import-not-at-top

  # As a run does (runs.setup): a benchmark times what training runs.
  cpu_settings = cpu_runtime.configure(config.cpu_keep_step_memory)
  setup = _setup(config, batch_per_device=batch_per_device, seq_len=seq_len, vocab_size=vocab_size,
                 num_puzzle_identifiers=num_puzzle_identifiers)
  model, mesh, global_batch = setup.model, setup.mesh, setup.global_batch
  seq_len, vocab_size, num_ids = setup.seq_len, setup.vocab_size, setup.num_ids
  state = jax.jit(setup.create_state, out_shardings=setup.state_sh)()
  rng = np.random.default_rng(0)
  host_batch = {"inputs": rng.integers(0, vocab_size, (global_batch, seq_len)).astype(np.int32),
                "labels": rng.integers(0, vocab_size, (global_batch, seq_len)).astype(np.int32),
                "puzzle_identifiers": rng.integers(0, num_ids, (global_batch,)).astype(np.int32)}
  batch = jax.device_put(host_batch, setup.batch_sh)
  carry = jax.jit(lambda b: act.initial_carry(model, b), out_shardings=setup.carry_sh)(batch)

  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, carry, batch).compile()
  compile_train = time.perf_counter() - t0
  holder = {"state": state, "carry": carry}

  def one_step():
    holder["state"], holder["carry"], metrics = compiled(holder["state"], holder["carry"], batch)
    return metrics
  jax.block_until_ready(one_step())  # warm-up
  cpu0, faults0 = time.process_time(), _minor_faults()
  train_time = _time(one_step, num_steps)
  # CPU seconds of this process per step: on a CPU backend shared with other
  # jobs, steadier than the wall time (which counts the time others run).
  train_cpu_time = (time.process_time() - cpu0) / num_steps
  train_faults = (_minor_faults() - faults0) / num_steps
  step_times = _blocked_times(one_step, num_steps)

  profile = None
  if profile_dir:
    from trm_jax import step_profile  # pylint: disable=g-import-not-at-top
    jax.profiler.start_trace(profile_dir)
    try:
      for _ in range(profile_steps):
        jax.block_until_ready(one_step())
    finally:
      jax.profiler.stop_trace()
    profile = step_profile.summarize(profile_dir, profile_steps)

  flops = step_flops(model, global_batch)
  peak = peak_flops(jax.devices()[0])
  result = {
      "device": jax.devices()[0].device_kind, "num_devices": mesh.size, "mesh": dict(mesh.shape),
      "jax": jax.__version__, "kernels": model.kernels, "remat": model.remat,
      "forward_dtype": model.forward_dtype, "global_batch": global_batch, "seq_len": seq_len, "hidden_size": model.hidden_size,
      "arch": model.arch, "H_cycles": model.H_cycles, "L_cycles": model.L_cycles, "L_layers": model.L_layers,
      "H_layers": model.H_layers, "mlp_t": model.mlp_t,
      "train_steps_per_s": 1.0 / train_time,
      "train_s_per_step": train_time,
      # The same number of steps again, each waited for on its own.
      "train_s_per_step_min": min(step_times),
      "train_s_per_step_median": float(np.median(step_times)),
      "train_process_cpu_s_per_step": train_cpu_time,
      # Memory the kernel mapped in per step (4 KiB pages; see trm_jax.cpu_runtime).
      "train_minor_page_faults_per_step": train_faults, "cpu_runtime": cpu_settings,
      "train_tokens_per_s": global_batch * seq_len / train_time,
      "train_flops_per_step": flops["train"],
      "train_flops_per_s": flops["train"] / train_time,
      "train_mfu": (flops["train"] / train_time / (peak * mesh.size)) if peak else None,
      "train_flops_recomputed_per_step": flops["train_recomputed"],
      "train_hfu": ((flops["train"] + flops["train_recomputed"]) / train_time / (peak * mesh.size)) if peak else None,
      "compile_train_s": compile_train,
  }
  if profile is not None:
    result["train_profile"] = profile
  if matmul_peak:
    result.update(matmul_flops_per_s(model.forward_dtype))
    # The median single step's rate over all devices, against one device's matmul rate each.
    result["train_matmul_fraction"] = (flops["train"] / result["train_s_per_step_median"]
                                       / (result["matmul_flops_per_s"] * mesh.size))
  if not skip_eval:
    state_sh = setup.state_sh
    eval_fn = jax.jit(lambda p, t, b: steps.eval_step(p, t, b, model=model),
                      in_shardings=(state_sh.params, state_sh.puzzle_emb, setup.batch_sh))
    t0 = time.perf_counter()
    eval_compiled = eval_fn.lower(holder["state"].params, holder["state"].puzzle_emb, batch).compile()
    result["compile_eval_s"] = time.perf_counter() - t0
    params, table = holder["state"].params, holder["state"].puzzle_emb
    jax.block_until_ready(eval_compiled(params, table, batch))
    eval_time = _time(lambda: eval_compiled(params, table, batch), eval_steps)
    eval_flops = flops["eval_call"] * model.halt_max_steps
    result.update({
        "eval_batches_per_s": 1.0 / eval_time,
        "eval_tokens_per_s": global_batch * seq_len / eval_time,
        "eval_flops_per_batch": eval_flops,
        "eval_mfu": (eval_flops / eval_time / (peak * mesh.size)) if peak else None,
    })
  stats = jax.devices()[0].memory_stats() or {}
  result["peak_memory_bytes"] = stats.get("peak_bytes_in_use")
  analysis = compiled.memory_analysis()
  if analysis is not None:
    result["compiled_temp_bytes"] = int(getattr(analysis, "temp_size_in_bytes", 0))
    result["compiled_argument_bytes"] = int(getattr(analysis, "argument_size_in_bytes", 0))
  return result


def _define_flags():
  """Flags exist only when this runs as a program, so that other tools can import it."""
  config_flags.DEFINE_config_file("config", "configs/arc.py", "Config file (configs/x.py[:arg]).", lock_config=True)
  flags.DEFINE_integer("batch_per_device", 0, "Examples per device (0: global_batch_size / devices).")
  flags.DEFINE_integer("steps", 10, "Timed train steps.")
  flags.DEFINE_integer("eval_steps", 2, "Timed eval steps (each runs halt_max_steps ACT calls).")
  flags.DEFINE_integer("seq_len", 0, "Sequence length when data_path is absent (0: 900, as ARC and mazes).")
  flags.DEFINE_integer("vocab_size", 0, "Vocabulary when data_path is absent (0: 12, as ARC).")
  flags.DEFINE_integer("num_puzzle_identifiers", 0, "Puzzle ids when data_path is absent (0: 1000).")
  flags.DEFINE_bool("skip_eval", False, "Time only the train step.")
  flags.DEFINE_string("profile_dir", "", "Also trace --profile_steps train steps into this directory and add "
                      "where their time goes (trm_jax.step_profile) to the JSON line.")
  flags.DEFINE_integer("profile_steps", 2, "Train steps traced with --profile_dir.")
  flags.DEFINE_bool("matmul_peak", False, "Also time a large square matmul in the forward dtype and report the "
                    "step's FLOP rate as a fraction of it (a ceiling where no peak is known, as on CPUs).")
  flags.DEFINE_bool("find_max_batch", False,
                    "Find the largest batch_per_device whose train step fits in device memory, then time it.")
  flags.DEFINE_float("memory_limit_gb", 0.0,
                     "Memory the search may fill, GiB (0: 97% of what the device's allocator may use).")
  flags.DEFINE_integer("batch_granularity", 8, "The search's per-device batch is a multiple of this.")
  flags.DEFINE_bool("search_only", False, "With --find_max_batch: print the search's result without timing it.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from trm_jax import cpu_runtime, errors, runs  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure(FLAGS.config.cpu_keep_step_memory)  # before --find_max_batch's compiles
  dims = dict(seq_len=FLAGS.seq_len, vocab_size=FLAGS.vocab_size,
              num_puzzle_identifiers=FLAGS.num_puzzle_identifiers)
  run = lambda batch: benchmark(FLAGS.config, batch_per_device=batch, num_steps=FLAGS.steps,
                                eval_steps=FLAGS.eval_steps, skip_eval=FLAGS.skip_eval,
                                profile_dir=FLAGS.profile_dir, profile_steps=FLAGS.profile_steps,
                                matmul_peak=FLAGS.matmul_peak, **dims)
  try:
    if not FLAGS.find_max_batch:
      result = run(FLAGS.batch_per_device)
    else:
      if FLAGS.batch_per_device:
        raise ValueError("--find_max_batch chooses the batch; leave --batch_per_device unset")
      if FLAGS.batch_granularity < 1:
        raise ValueError(f"--batch_granularity must be >= 1, got {FLAGS.batch_granularity}")
      limit = int(FLAGS.memory_limit_gb * 2**30)
      if not limit:
        device_limit = device_memory_limit()
        if device_limit is None:
          raise ValueError(f"{jax.devices()[0].device_kind} reports no memory limit; pass --memory_limit_gb")
        limit = int(0.97 * device_limit)  # headroom for fragmentation
      log = lambda msg: print(f"find_max_batch: {msg}", file=sys.stderr, flush=True)
      batch, probes = find_max_batch(FLAGS.config, limit, granularity=FLAGS.batch_granularity, log=log, **dims)
      search = {"memory_limit_bytes": limit, "batch_per_device": batch, "probes": probes}
      if FLAGS.search_only:
        model = FLAGS.config.model
        first, second = probes[0], probes[1]
        per_example = (second["bytes"] - first["bytes"]) / (second["batch_per_device"] - first["batch_per_device"])
        print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                          "kernels": model.kernels, "remat": model.remat, "forward_dtype": model.forward_dtype,
                          "bytes_per_example": per_example, "max_batch_search": search}), flush=True)
        return
      while True:
        try:
          result = run(batch)
          break
        except Exception as e:  # pylint: disable=broad-except
          # The estimate ignores fragmentation: step down until it runs.
          if not runs.is_out_of_memory(e) or batch <= FLAGS.batch_granularity:
            raise
          log(f"batch_per_device={batch} ran out of memory; trying {batch - FLAGS.batch_granularity}")
          batch -= FLAGS.batch_granularity
      result["max_batch_search"] = {**search, "batch_per_device": batch}
  except (errors.UserError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
