"""Tests of trm_jax.optim: AdamATan2, sparse SignSGD, schedule, EMA, parameter groups."""

import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax import optim

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# AdamATan2
# ----------------------------------------------------------------------------


def adam_atan2_numpy(param, grads, lr_of_step, b1, b2, wd):
  """SPEC §6 written out in float64 numpy; returns the params after each step."""
  p = np.array(param, np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  history = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    lr = lr_of_step(t)
    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)
    v = v + (1 - b2) * (g * g - v)
    p = p - (lr / (1 - b1**t)) * np.arctan2(m, np.sqrt(v) / np.sqrt(1 - b2**t))
    history.append(p)
  return history


def rel_err(got, want):
  got = np.asarray(got, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def golden_adam(golden_dir):
  with np.load(golden_dir / "adam_atan2.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("x64_globally_on", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adam_atan2_matches_golden(golden_adam, dtype, x64_globally_on):
  if x64_globally_on:
    with jax.enable_x64(True):
      errors = optim.check_adam_atan2_golden(golden_adam, dtype)
  else:
    errors = optim.check_adam_atan2_golden(golden_adam, dtype)
  assert sorted(errors) == [f"param{t}" for t in range(1, 6)]
  assert max(errors.values()) < optim.ADAM_ATAN2_GOLDEN_TOLERANCE[dtype], errors
  # The check leaves the global setting as it found it.
  assert jnp.zeros(1).dtype == jnp.float32


def test_adam_atan2_golden_rejects_bad_files(golden_adam):
  missing = dict(golden_adam)
  del missing["grad3"]
  with pytest.raises(ValueError, match="'grad3'"):
    optim.check_adam_atan2_golden(missing)
  reshaped = dict(golden_adam, param4=golden_adam["param4"][:, :2])
  with pytest.raises(ValueError, match="'param4'"):
    optim.check_adam_atan2_golden(reshaped)
  no_hparams = {k: v for k, v in golden_adam.items() if k != "hparams_json"}
  with pytest.raises(ValueError, match="'hparams_json'"):
    optim.check_adam_atan2_golden(no_hparams)
  no_lr = dict(golden_adam, hparams_json=np.array('{"beta1": 0.9, "beta2": 0.95, '
                                                  '"weight_decay": 0.1, "steps": 5}'))
  with pytest.raises(ValueError, match="'lr'"):
    optim.check_adam_atan2_golden(no_lr)


def test_adam_atan2_golden_hparams_are_read_from_the_file(golden_adam):
  # The same file relabelled with another lr no longer matches: the check
  # really uses the file's hyper-parameters.
  wrong_lr = dict(golden_adam, hparams_json=np.array(
      '{"lr": 0.02, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "steps": 5}'))
  assert max(optim.check_adam_atan2_golden(wrong_lr).values()) > 1e-3


def _synthetic_problem(steps=6):
  rng = np.random.default_rng(7)
  params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(5)}
  grads = []
  for t in range(steps):
    # Scales that vary a lot across steps, plus an element that is always 0.
    g = {"w": rng.standard_normal((4, 3)) * 10.0**(t - 3), "b": rng.standard_normal(5)}
    g["w"][0, 0] = 0.0
    grads.append(g)
  return params, grads


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_adam_atan2_other_hparams_match_numpy(dtype, tol):
  b1, b2, wd = 0.8, 0.99, 0.05
  lr_of_step = lambda t: 1e-2 * (1 + 0.5 * t)  # pylint: disable=unnecessary-lambda-assignment
  params, grads = _synthetic_problem()
  opt = optim.adam_atan2(lr_of_step, b1=b1, b2=b2, weight_decay=wd)
  with jax.enable_x64(dtype == "float64"):
    p = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    state = opt.init(p)
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves((state.mu, state.nu)))
    history = []
    for g in grads:
      updates, state = opt.update(jax.tree.map(lambda x: jnp.asarray(x, dtype), g), state, p)
      p = optax.apply_updates(p, updates)
      history.append(jax.tree.map(np.asarray, p))
    assert int(state.count) == len(grads)
  for name in params:
    want = adam_atan2_numpy(params[name], [g[name] for g in grads], lr_of_step, b1, b2, wd)
    for t, (got_t, want_t) in enumerate(zip(history, want), start=1):
      assert rel_err(got_t[name], want_t) < tol, (name, t)


def test_adam_atan2_keeps_bfloat16():
  params, grads = _synthetic_problem(steps=3)
  opt = optim.adam_atan2(1e-2, weight_decay=0.1)
  results = {}
  for dtype in (jnp.bfloat16, jnp.float32):
    p = jax.tree.map(lambda x, d=dtype: jnp.asarray(x, d), params)
    state = opt.init(p)
    for g in grads:
      updates, state = opt.update(jax.tree.map(lambda x, d=dtype: jnp.asarray(x, d), g), state, p)
      p = optax.apply_updates(p, updates)
    assert all(x.dtype == dtype for x in jax.tree.leaves((p, state.mu, state.nu)))
    results[dtype] = p
  for name in params:
    np.testing.assert_allclose(np.asarray(results[jnp.bfloat16][name], np.float32),
                               results[jnp.float32][name], rtol=2e-2, atol=2e-2)


def test_adam_atan2_needs_params():
  opt = optim.adam_atan2(1e-3)
  state = opt.init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="params"):
    opt.update({"w": jnp.ones(3)}, state)


def test_adam_atan2_jit_compiles_once():
  traces = []
  opt = optim.adam_atan2(optim.cosine_schedule_with_warmup(1e-3, 2, 10, 0.1))

  @jax.jit
  def step(p, state, g):
    traces.append(1)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state

  params, grads = _synthetic_problem(steps=5)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = opt.init(p)
  for g in grads:
    p, state = step(p, state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g))
  assert len(traces) == 1
  assert int(state.count) == 5
  assert jax.tree.map(lambda x: x.dtype, p) == {"w": jnp.float32, "b": jnp.float32}


def test_adam_atan2_first_step_uses_lr_of_step_one():
  # With lr(1) = 0 the first update changes nothing; with lr(0) it would.
  schedule = lambda t: jnp.where(t == 1, 0.0, 1.0)  # pylint: disable=unnecessary-lambda-assignment
  opt = optim.adam_atan2(schedule, weight_decay=0.5)
  p = jnp.array([1.0, -2.0])
  updates, _ = opt.update(jnp.array([0.3, 0.4]), opt.init(p), p)
  np.testing.assert_array_equal(updates, 0.0)


# ----------------------------------------------------------------------------
# Sparse SignSGD
# ----------------------------------------------------------------------------


def sparse_sign_sgd_numpy(table, ids, grads, lr, wd):
  """Dense reference: sum gradients per id, update the touched rows."""
  table = np.array(table, np.float64)
  grad_sum = np.zeros_like(table)
  np.add.at(grad_sum, ids, grads)
  touched = np.unique(ids)
  table[touched] = table[touched] * (1 - lr * wd) - lr * np.sign(grad_sum[touched])
  return table


def _sparse_case(num_rows, dim, batch, seed=0):
  rng = np.random.default_rng(seed)
  table = rng.standard_normal((num_rows, dim)).astype(np.float32)
  ids = rng.permutation(num_rows)[:batch].astype(np.int32)  # distinct, then:
  ids[1] = ids[0]  # a duplicate pair ...
  ids[2] = ids[0]  # ... and triple
  grads = rng.standard_normal((batch, dim)).astype(np.float32)
  grads[3] = 0.0  # a row whose gradient is zero: decays, no sign step
  ids[5] = ids[4]  # duplicates whose gradients cancel in one column
  grads[5, 0] = -grads[4, 0]
  return table, ids, grads


def test_sparse_sign_sgd_matches_dense_reference():
  num_rows, lr, wd = 50, 0.01, 0.1
  table, ids, grads = _sparse_case(num_rows, 6, 12)
  new = np.asarray(jax.jit(optim.sparse_sign_sgd_update)(table, ids, grads, lr, wd))
  want = sparse_sign_sgd_numpy(table, ids, grads, lr, wd)
  touched = np.unique(ids)
  untouched = np.setdiff1d(np.arange(num_rows), touched)
  assert untouched.size > 0
  np.testing.assert_array_equal(new[untouched], table[untouched])  # bit-identical
  np.testing.assert_allclose(new[touched], want[touched], rtol=1e-6, atol=1e-7)
  # The zero-gradient row and the cancelled column only decayed.
  np.testing.assert_allclose(new[ids[3]], table[ids[3]] * (1 - lr * wd), rtol=1e-6)
  np.testing.assert_allclose(new[ids[4], 0], table[ids[4], 0] * (1 - lr * wd), rtol=1e-6)


def test_sparse_sign_sgd_ignores_out_of_range_ids():
  num_rows = 20
  table, ids, grads = _sparse_case(num_rows, 4, 10, seed=1)
  ids_bad = ids.copy()
  ids_bad[6:8] = [-1, num_rows]
  kept = np.ones(len(ids), bool)
  kept[6:8] = False
  new = np.asarray(jax.jit(optim.sparse_sign_sgd_update)(table, ids_bad, grads, 0.1, 0.2))
  want = sparse_sign_sgd_numpy(table, ids[kept], grads[kept], 0.1, 0.2)
  np.testing.assert_allclose(new, want, rtol=1e-6, atol=1e-7)


def test_sparse_sign_sgd_all_ids_equal_and_traced_lr():
  table = np.arange(12, dtype=np.float32).reshape(6, 2)
  ids = np.full(4, 3, np.int32)
  grads = np.array([[1, -1], [1, -1], [-1, 1], [0.5, -3]], np.float32)
  new = jax.jit(optim.sparse_sign_sgd_update)(table, ids, grads, jnp.float32(0.5), jnp.float32(0.2))
  want = table.copy()
  want[3] = table[3] * 0.9 - 0.5 * np.sign(grads.sum(0))
  np.testing.assert_array_equal(np.asarray(new), want)


def test_sparse_sign_sgd_makes_no_dense_temporary():
  num_rows, dim, batch = 100_000, 8, 16
  table = jax.ShapeDtypeStruct((num_rows, dim), jnp.float32)
  ids = jax.ShapeDtypeStruct((batch,), jnp.int32)
  grads = jax.ShapeDtypeStruct((batch, dim), jnp.float32)

  # jaxpr: besides the input, exactly one [N, E] value is made (the result).
  closed = jax.make_jaxpr(optim.sparse_sign_sgd_update)(table, ids, grads, 0.01, 0.1)
  made = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      made.extend(v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
          if hasattr(sub, "eqns"):  # a Jaxpr
            visit(sub)
          elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # a ClosedJaxpr
            visit(sub.jaxpr)

  visit(closed.jaxpr)
  assert made.count((num_rows, dim)) == 1
  assert [v.aval.shape for v in closed.jaxpr.invars].count((num_rows, dim)) == 1
  assert all(math.prod(s) < num_rows for s in made if s != (num_rows, dim))

  # Compiled with the table donated: the entry computation holds exactly two
  # [N, E] buffers, the parameter and the scatter into it (no copy, no zeros).
  hlo = jax.jit(optim.sparse_sign_sgd_update, donate_argnums=0).lower(
      table, ids, grads, 0.01, 0.1).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  defs = re.findall(r"^\s*(?:ROOT )?%\S+ = f32\[100000,8\]\S* (\w[\w-]*)\(", entry, re.M)
  assert len(defs) == 2 and defs[0] == "parameter", defs


def test_sparse_sign_sgd_sharded_over_8_devices():
  # XLA_FLAGS must be set before jax is imported, hence a fresh interpreter.
  script = textwrap.dedent("""
      import re
      import numpy as np
      import jax
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from trm_jax import optim
      assert jax.device_count() == 8, jax.devices()
      num_rows, dim, batch = 4096, 8, 64
      rng = np.random.default_rng(0)
      table = rng.standard_normal((num_rows, dim)).astype(np.float32)
      ids = rng.integers(0, num_rows, batch).astype(np.int32)
      ids[:12] = ids[40]  # duplicates spread over several devices' shards
      grads = rng.standard_normal((batch, dim)).astype(np.float32)
      want = np.asarray(jax.jit(optim.sparse_sign_sgd_update)(table, ids, grads, 0.01, 0.1))
      mesh = Mesh(np.array(jax.devices()), ("data",))
      rows = NamedSharding(mesh, P("data", None))
      items = NamedSharding(mesh, P("data"))
      update = jax.jit(optim.sparse_sign_sgd_update, in_shardings=(rows, items, rows, None, None),
                       out_shardings=rows, donate_argnums=0)
      args = (jax.device_put(table, rows), jax.device_put(ids, items), jax.device_put(grads, rows))
      hlo = update.lower(*args, 0.01, 0.1).compile().as_text()
      assert "f32[4096,8]" not in hlo, "a full copy of the table was made on a device"
      got = update(*args, 0.01, 0.1)
      assert got.sharding.spec == P("data", None), got.sharding
      np.testing.assert_array_equal(np.asarray(got), want)
      print("SHARDED_OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------
# Schedule, total steps, EMA
# ----------------------------------------------------------------------------


def schedule_python(step, base_lr, warmup, total, min_ratio):
  if step < warmup:
    return base_lr * step / max(1, warmup)
  progress = (step - warmup) / max(1, total - warmup)
  return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))))


@pytest.mark.parametrize("min_ratio", [1.0, 0.1])
def test_cosine_schedule_with_warmup(min_ratio):
  base_lr, warmup, total = 1e-3, 10, 110
  schedule = optim.cosine_schedule_with_warmup(base_lr, warmup, total, min_ratio)
  expected = {0: 0.0, 5: base_lr / 2, warmup: base_lr,
              60: base_lr * (min_ratio + (1 - min_ratio) / 2), total: base_lr * min_ratio}
  jitted = jax.jit(schedule)
  for step, want in expected.items():
    assert float(schedule(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step
    assert float(jitted(jnp.int32(step))) == pytest.approx(want, rel=1e-6, abs=1e-12), step
  steps = jnp.arange(0, total + 1)
  got = np.asarray(jax.vmap(schedule)(steps))
  want = [schedule_python(s, base_lr, warmup, total, min_ratio) for s in range(total + 1)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_cosine_schedule_without_warmup():
  schedule = optim.cosine_schedule_with_warmup(2.0, 0, 4, 0.0)
  np.testing.assert_allclose([float(schedule(s)) for s in range(5)],
                             [2.0, 1.0 + math.sqrt(0.5), 1.0, 1.0 - math.sqrt(0.5), 0.0],
                             rtol=1e-6, atol=1e-6)


def test_total_train_steps():
  assert optim.total_train_steps(100000, 960, 1.5, 768) == int(100000 * 960 * 1.5 / 768)
  assert optim.total_train_steps(3, 10, 1.0, 7) == 4  # int() truncates 4.28...


def test_ema_update():
  ema = {"a": jnp.array([1.0, 2.0], jnp.float32), "b": jnp.array([4.0], jnp.bfloat16)}
  params = {"a": jnp.array([3.0, -2.0], jnp.float32), "b": jnp.array([0.0], jnp.bfloat16)}
  new = jax.jit(optim.ema_update)(ema, params, 0.75)
  np.testing.assert_allclose(new["a"], [1.5, 1.0], rtol=1e-7)
  np.testing.assert_allclose(np.asarray(new["b"], np.float32), [3.0])
  assert new["a"].dtype == jnp.float32 and new["b"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------
# The two parameter groups
# ----------------------------------------------------------------------------

HPARAMS = dict(lr=1e-3, weight_decay=0.1, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.2,
               beta1=0.9, beta2=0.95, warmup_steps=3, total_steps=20, lr_min_ratio=0.1)


def _dense_problem():
  rng = np.random.default_rng(3)
  params = {"H_init": jnp.asarray(rng.standard_normal(8), jnp.float32),
            "blocks": {"w": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)},
            "head": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)}
  grads = [jax.tree.map(lambda x, s=s: jnp.asarray(rng.standard_normal(x.shape) * s, x.dtype),
                        params) for s in (100.0, 0.01, 1.0)]
  return params, grads


def _run(transform, params, grads):
  state = transform.init(params)
  step = jax.jit(lambda p, s, g: _apply(transform, p, s, g))
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _apply(transform, params, state, grads):
  updates, state = transform.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_make_optimizers_plain_is_adam_atan2_with_schedule():
  params, grads = _dense_problem()
  opt = optim.make_optimizers(**HPARAMS)
  reference = optim.adam_atan2(optim.cosine_schedule_with_warmup(1e-3, 3, 20, 0.1), 0.9, 0.95, 0.1)
  got, _ = _run(opt.dense, params, grads)
  want, _ = _run(reference, params, grads)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not np.array_equal(got["head"], params["head"])


@pytest.mark.parametrize("as_function", [False, True])
def test_trainable_mask_freezes_leaves(as_function):
  params, grads = _dense_problem()
  mask = {"H_init": False, "blocks": {"w": True}, "head": True}
  opt = optim.make_optimizers(**HPARAMS, trainable_mask=(lambda _: mask) if as_function else mask)
  got, state = _run(opt.dense, params, grads)
  np.testing.assert_array_equal(got["H_init"], params["H_init"])  # no update, no decay
  # The trainable leaves move exactly as AdamATan2 on them alone.
  reference = optim.adam_atan2(optim.cosine_schedule_with_warmup(1e-3, 3, 20, 0.1), 0.9, 0.95, 0.1)
  trainable = {"blocks": params["blocks"], "head": params["head"]}
  want, _ = _run(reference, trainable, [{"blocks": g["blocks"], "head": g["head"]} for g in grads])
  np.testing.assert_array_equal(got["head"], want["head"])
  np.testing.assert_array_equal(got["blocks"]["w"], want["blocks"]["w"])
  # No moments are kept for the frozen leaf.
  assert sum(x.size for x in jax.tree.leaves(state)) < sum(
      x.size for x in jax.tree.leaves(_run(reference, params, grads[:1])[1]))


def test_freeze_weights_freezes_every_dense_leaf():
  params, grads = _dense_problem()
  opt = optim.make_optimizers(**HPARAMS, freeze_weights=True)
  got, _ = _run(opt.dense, params, grads)
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_grad_clipping_only_when_configured():
  params, grads = _dense_problem()
  schedule = optim.cosine_schedule_with_warmup(1e-3, 3, 20, 0.1)
  reference = optim.adam_atan2(schedule, 0.9, 0.95, 0.1)
  unclipped, _ = _run(reference, params, grads)
  clip_norm = 1.0
  clipped_grads = []
  for g in grads:
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
    scale = min(1.0, clip_norm / norm)
    clipped_grads.append(jax.tree.map(lambda x, s=scale: x * s, g))
  manually_clipped, _ = _run(reference, params, clipped_grads)

  got_off, _ = _run(optim.make_optimizers(**HPARAMS).dense, params, grads)
  got_on, _ = _run(optim.make_optimizers(**HPARAMS, grad_clip_norm=clip_norm).dense, params, grads)
  jax.tree.map(np.testing.assert_array_equal, got_off, unclipped)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got_on, manually_clipped)
  # Clipping changes the result here (the gradient scales differ across steps).
  assert np.max(np.abs(np.asarray(got_on["head"]) - np.asarray(unclipped["head"]))) > 1e-5
  with pytest.raises(ValueError, match="grad_clip_norm"):
    optim.make_optimizers(**HPARAMS, grad_clip_norm=0.0)


def test_puzzle_emb_update_and_learning_rates():
  opt = optim.make_optimizers(**HPARAMS)
  table, ids, grads = _sparse_case(30, 4, 8, seed=2)
  update = jax.jit(opt.puzzle_emb_update)
  for step in (1, 3, 12):
    lr_emb = optim.cosine_schedule_with_warmup(1e-2, 3, 20, 0.1)(step)
    got = update(table, ids, grads, step)
    want = optim.sparse_sign_sgd_update(table, ids, grads, lr_emb, 0.2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    rates = opt.learning_rates(step)
    assert float(rates["lr"]) == pytest.approx(schedule_python(step, 1e-3, 3, 20, 0.1), rel=1e-6)
    assert float(rates["puzzle_emb_lr"]) == pytest.approx(
        schedule_python(step, 1e-2, 3, 20, 0.1), rel=1e-6)
