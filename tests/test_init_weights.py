"""The original's torch.save checkpoints as --config.init_weights, read without torch.

Two fixtures in tests/data were made once with torch 2.14.1 (CPU), by a
short script that imports torch and numpy only:

- ``trm_attn_rope_state_dict.pt``: the ``param/*`` weights of the golden file
  ``trm_attn_rope.npz`` registered under their names in a tree of empty
  ``torch.nn.Module``s shaped as the original's (a loss head whose ``.model``
  holds ``.inner``; ``H_init``, ``L_init`` and ``puzzle_emb.weights`` as
  persistent buffers, the rest as parameters), wrapped in ``torch.compile``
  as the original's ``pretrain.py`` does, then
  ``torch.save(compiled.state_dict(), path)``: the names are the original's
  checkpoint names, ``_orig_mod.model.inner.<...>``.
- ``dtypes_and_views.pt``: ``torch.save`` of an OrderedDict of small tensors
  whose values the tests below spell out: a float32 ``arange(12)`` matrix with
  its transpose, a sliced corner and a column (views sharing its storage, with
  offsets and non-contiguous strides), bfloat16 (also transposed), float16,
  float64, int64, int32, uint8, bool, a 0-d and an empty tensor.

The other files are written here, without torch, by ``torch_zip_util``.
"""

import dataclasses
import json
import pickle
import zipfile

import numpy as np
import pytest

import shared_paths
import torch_zip_util
from torch_zip_util import Call
from trm_jax import errors
from trm_jax import golden
from trm_jax import init_weights
from trm_jax import runs
from trm_jax import torch_checkpoint
from trm_jax import train
from trm_jax import weights
from trm_jax.models import trm

DATA = shared_paths.REPO_ROOT / "tests" / "data"
ROPE_PT = DATA / "trm_attn_rope_state_dict.pt"
VIEWS_PT = DATA / "dtypes_and_views.pt"


def golden_config(golden_dir, **changes) -> trm.TRMConfig:
  cfg = json.loads(str(np.load(golden_dir / "trm_attn_rope.npz")["config_json"]))
  return dataclasses.replace(trm.TRMConfig.from_dict(cfg), **changes)


def golden_state(golden_dir) -> dict[str, np.ndarray]:
  with np.load(golden_dir / "trm_attn_rope.npz") as z:
    return {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}


def one_line_error(exc_info, *expected) -> str:
  text = str(exc_info.value)
  assert "\n" not in text, text
  for e in expected:
    assert str(e) in text, (e, text)
  return text


# ---------------------------------------------------------------------------
# The reader.


def test_reads_every_dtype_and_view():
  d = torch_checkpoint.load(VIEWS_PT)
  matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
  expected = {"matrix": matrix, "transposed": matrix.T, "corner": matrix[1:, 2:], "column": matrix[:, 1],
              "bf16": np.array([1.0, -2.5, 0.15625, 384.0, 2.0 ** -10], np.float32),
              "f16": np.array([0.5, -1.25, 65504.0], np.float16), "f64": np.array([[1.0 / 3.0]]),
              "i64": np.array([-(2 ** 40), 7]), "i32": np.array([-3, 4], np.int32),
              "u8": np.array([0, 255], np.uint8), "flags": np.array([True, False, True]),
              "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32),
              "bf16_transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T}
  assert list(d) == list(expected)
  for name, want in expected.items():
    assert d[name].dtype == want.dtype and d[name].shape == want.shape, name
    assert np.array_equal(d[name], want), name


def test_original_checkpoint_names_and_values(golden_dir):
  d = torch_checkpoint.load(ROPE_PT)
  ref = golden_state(golden_dir)
  assert sorted(d) == sorted(f"_orig_mod.model.{k}" for k in ref)
  for key, value in d.items():
    assert value.dtype == np.float32 and np.array_equal(value, ref[weights.original_name(key)]), key


def test_original_checkpoint_reproduces_the_golden_logits(golden_dir, tmp_path):
  """The done-criterion: the golden file with the .pt's weights passes the golden checks.

  Its eval trajectory (every step's logits, Q values and carry) and first
  training step (loss and every gradient) are checked; the train-mode
  trajectory and bfloat16 entries are left out to save two compilations
  (tests/test_golden.py checks them on the same weights).
  """
  params, table, notices = init_weights.load(golden_config(golden_dir), ROPE_PT)
  assert notices == []
  with np.load(golden_dir / "trm_attn_rope.npz") as z:
    entries = {k: z[k] for k in z.files if not k.startswith(("param/", "traj/", "eval_bf16/"))}
  # Without the trajectory, the last train-mode call is train0, on the file's batch.
  entries["grad/puzzle_emb_local_ids"] = entries["batch/puzzle_identifiers"]
  entries.update({f"param/{k}": v for k, v in torch_checkpoint.load(ROPE_PT).items()})
  np.savez(tmp_path / "from_pt.npz", **entries)
  report = golden.check_model_file(golden.GoldenFile(tmp_path / "from_pt.npz"))
  assert report.ok, report.line("from_pt")
  assert report.errors["eval.logits"] < 1e-4 and "grad" in report.errors
  # The weights themselves are the golden ones, bit for bit.
  ref_params, ref_table = weights.import_state_dict(golden_config(golden_dir), golden_state(golden_dir))
  assert np.array_equal(table, ref_table)
  for (path, ours), (_, ref) in zip(sorted(_leaves(params)), sorted(_leaves(ref_params))):
    assert np.array_equal(ours, ref), path


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), np.asarray(v)


class _Evil:
  def __reduce__(self):
    import os  # pylint: disable=g-import-not-at-top
    return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("payload, refused", [
    (Call("os", "system", "echo this must never run"), "os.system"),
    (Call("builtins", "eval", "1 + 1"), "builtins.eval"),
    ({"inner.H_init": Call("builtins", "exec", "x = 1")}, "builtins.exec"),
    (Call("torch", "load", "other.pt"), "torch.load"),
    (Call("torch._utils", "_rebuild_tensor_v2_evil"), "torch._utils._rebuild_tensor_v2_evil"),
    (Call("models.recursive_reasoning.trm", "TinyRecursiveReasoningModel_ACTV1"), "models.recursive_reasoning"),
    ({"w": torch_zip_util.Tensor(torch_zip_util.Storage("0", "ComplexFloatStorage", 2, "cpu"), (2,))},
     "torch.ComplexFloatStorage"),
])
def test_hostile_pickles_are_refused_naming_the_global(tmp_path, payload, refused):
  path = tmp_path / "evil.pt"
  torch_zip_util.write_zip(path, torch_zip_util.dumps(payload))
  with pytest.raises(torch_checkpoint.TorchFormatError) as e:
    torch_checkpoint.load(path)
  one_line_error(e, path, "refused pickle global", refused)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_real_malicious_pickle_is_refused(tmp_path, protocol):
  path = tmp_path / "evil.pt"
  torch_zip_util.write_zip(path, pickle.dumps({"w": _Evil()}, protocol=protocol))
  with pytest.raises(torch_checkpoint.TorchFormatError) as e:
    torch_checkpoint.load(path)
  one_line_error(e, path, "refused pickle global", ".system")  # posix.system on Linux


def _corrupt_copy(src, dst, member_suffix):
  """``src`` with the first byte of one stored member flipped (its CRC no longer matches)."""
  raw = bytearray(src.read_bytes())
  with zipfile.ZipFile(src) as zf:
    info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
  # The data follow the 30-byte local header, the name and the extra field.
  name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
  extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
  start = info.header_offset + 30 + name_len + extra_len
  raw[start] ^= 0xFF
  dst.write_bytes(bytes(raw))


def test_unreadable_files_are_one_line_errors(tmp_path):
  cases = []
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(ROPE_PT.read_bytes()[:len(ROPE_PT.read_bytes()) // 2])
  cases.append((truncated, "not a torch.save zip file"))
  text = tmp_path / "notes.pt"
  text.write_text("these are not weights\n")
  cases.append((text, "not a torch.save zip file"))
  empty = tmp_path / "empty.pt"
  empty.write_bytes(b"")
  cases.append((empty, "not a torch.save zip file"))
  corrupt = tmp_path / "corrupt.pt"
  _corrupt_copy(ROPE_PT, corrupt, "/data/3")
  cases.append((corrupt, "corrupt or truncated"))
  npz = tmp_path / "weights.npz"
  np.savez(npz, a=np.zeros(2))
  cases.append((npz, "not a torch.save file"))
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
  cases.append((legacy, "legacy"))
  not_a_dict = tmp_path / "list.pt"
  torch_zip_util.write_zip(not_a_dict, torch_zip_util.dumps([1, 2]))
  cases.append((not_a_dict, "holds a list, not a state dict"))
  missing_storage = tmp_path / "missing_storage.pt"
  torch_zip_util.write_state_dict(missing_storage, {"inner.H_init": np.ones(4, np.float32)})
  with zipfile.ZipFile(missing_storage) as zf:
    members = {n: zf.read(n) for n in zf.namelist() if not n.endswith("/data/0")}
  torch_zip_util.write_zip(missing_storage, members["archive/data.pkl"])
  cases.append((missing_storage, "missing record 'archive/data/0'"))
  for path, expected in cases:
    with pytest.raises(torch_checkpoint.TorchFormatError) as e:
      torch_checkpoint.load(path)
    one_line_error(e, path, expected)


def test_non_tensor_entries_and_bad_views_are_refused(tmp_path):
  path = tmp_path / "x.pt"
  storage = torch_zip_util.Storage("0", "FloatStorage", 4, "cpu")
  raw = {"0": np.arange(4, dtype="<f4").tobytes()}
  hooks = Call("collections", "OrderedDict")
  cases = [
      ({"inner.H_init": torch_zip_util.Tensor(storage, (4,)), "step": 5}, "entry 'step' is an int (5), not a tensor"),
      ({"model": {"inner.H_init": torch_zip_util.Tensor(storage, (4,))}}, "entry 'model' is a dict"),
      ({"w": Call("torch._utils", "_rebuild_tensor_v2", storage, 1, (4,), (1,), False, hooks)},
       "runs past the storage's 4 elements"),
      ({"w": Call("torch._utils", "_rebuild_tensor_v2", storage, 0, (2, 3), (3, 1), False, hooks)},
       "runs past the storage's 4 elements"),
      ({"w": Call("torch._utils", "_rebuild_tensor_v2", "not a storage", 0, (1,), (1,), False, hooks)},
       "not a storage"),
      ({"w": Call("torch._utils", "_rebuild_tensor_v2", storage, -1, (1,), (1,), False, hooks)}, "malformed view"),
      ({"w": torch_zip_util.Tensor(torch_zip_util.Storage("0", "FloatStorage", 5, "cpu"), (5,))},
       "holds 16 bytes, its header says 5 x 4"),
      ({"w": torch_zip_util.Tensor(torch_zip_util.Storage("../x", "FloatStorage", 4, "cpu"), (4,))},
       "malformed storage key"),
  ]
  for payload, expected in cases:
    torch_zip_util.write_zip(path, torch_zip_util.dumps(payload), raw)
    with pytest.raises(torch_checkpoint.TorchFormatError) as e:
      torch_checkpoint.load(path)
    one_line_error(e, path, expected)


def test_test_writer_round_trip(tmp_path):
  """The writer the tests below use produces what the reader (and torch) read."""
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.0, -2.5], np.float32),
            "c": np.array([3, 4], np.int64)}
  torch_zip_util.write_state_dict(tmp_path / "w.pt", arrays, bfloat16=("b",))
  back = torch_checkpoint.load(tmp_path / "w.pt")
  assert list(back) == list(arrays)
  for k, v in arrays.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


# ---------------------------------------------------------------------------
# init_weights: format by content, names, the puzzle table, other architectures.


def test_format_is_told_by_content(golden_dir, tmp_path):
  config = golden_config(golden_dir)
  ref_params, ref_table = weights.import_state_dict(config, golden_state(golden_dir))
  npz_named_pt = tmp_path / "exported.pt"
  with open(npz_named_pt, "wb") as f:
    np.savez(f, **golden_state(golden_dir))
  step_file = tmp_path / "step_1000"  # the original's checkpoint names have no suffix
  step_file.write_bytes(ROPE_PT.read_bytes())
  for path in (npz_named_pt, step_file):
    params, table, _ = init_weights.load(config, path)
    assert np.array_equal(table, ref_table)
    assert np.array_equal(params["L_level"]["layers_1"]["mlp"]["down_proj"],
                          ref_params["L_level"]["layers_1"]["mlp"]["down_proj"])
  truncated = tmp_path / "step_2000"
  truncated.write_bytes(ROPE_PT.read_bytes()[:100_000])
  with pytest.raises(ValueError) as e:
    init_weights.load(config, truncated)
  one_line_error(e, truncated, "truncated or corrupt zip file")
  other_zip = tmp_path / "other.zip"
  with zipfile.ZipFile(other_zip, "w") as zf:
    zf.writestr("notes.txt", "not an array")
  with pytest.raises(ValueError) as e:
    init_weights.load(config, other_zip)
  one_line_error(e, other_zip, "member 'notes.txt' is not an .npy array")
  (tmp_path / "readme.txt").write_text("hello")
  with pytest.raises(ValueError) as e:
    init_weights.load(config, tmp_path / "readme.txt")
  one_line_error(e, tmp_path / "readme.txt", "not a weights file")
  with pytest.raises(ValueError) as e:
    init_weights.load(config, tmp_path / "absent.pt")
  one_line_error(e, "absent.pt", "no such file")


def test_puzzle_table_of_another_size_becomes_its_mean_row(golden_dir):
  trained = golden_state(golden_dir)[weights.PUZZLE_EMB_NAME]  # 10 rows
  mean = trained.astype(np.float64).mean(axis=0)
  for rows in (7, 25):
    params, table, notices = init_weights.load(golden_config(golden_dir, num_puzzle_identifiers=rows), ROPE_PT)
    assert table.shape == (rows, trained.shape[1]) and table.dtype == np.float32
    np.testing.assert_allclose(table, np.broadcast_to(mean, table.shape), rtol=1e-6, atol=1e-7)
    assert np.all(table == table[0])
    assert len(notices) == 1 and "10 rows" in notices[0] and f"{rows} puzzle identifiers" in notices[0]
    assert str(ROPE_PT) in notices[0]
    assert params["H_init"].shape == (64,)


def test_checkpoint_of_another_architecture_or_shape(golden_dir, tmp_path):
  cases = [
      (golden_config(golden_dir, L_layers=3), "missing weight 'inner.L_level.layers.2"),
      (golden_config(golden_dir, L_layers=1), "'inner.L_level.layers.1."),
      (golden_config(golden_dir, hidden_size=32, puzzle_emb_ndim=32), "has shape [12, 64], expected [12, 32]"),
      (golden_config(golden_dir, puzzle_emb_ndim=0, puzzle_emb_len=0), "'inner.puzzle_emb.weights' is not in"),
      (golden_config(golden_dir, puzzle_emb_ndim=128, puzzle_emb_len=2), "inner.puzzle_emb.weights"),
      (golden_config(golden_dir, pos_encodings="learned"), "missing weight 'inner.embed_pos.embedding_weight'"),
  ]
  for config, expected in cases:
    with pytest.raises(ValueError) as e:
      init_weights.load(config, ROPE_PT)
    one_line_error(e, ROPE_PT, expected)
  # The original's HRM: its H_level has no place in a TRM.
  hrm = tmp_path / "hrm.pt"
  with np.load(golden_dir / "arch_hrm.npz") as z:
    torch_zip_util.write_state_dict(hrm, {f"_orig_mod.model.{k[6:]}": z[k] for k in z.files
                                          if k.startswith("param/")})
  with pytest.raises(ValueError) as e:
    init_weights.load(golden_config(golden_dir), hrm)
  one_line_error(e, hrm, "inner.H_level.", "another architecture")
  # Integer weights and a name given twice.
  state = golden_state(golden_dir)
  bad = tmp_path / "bad.pt"
  torch_zip_util.write_state_dict(bad, {**state, "inner.H_init": np.zeros(64, np.int64)})
  with pytest.raises(ValueError) as e:
    init_weights.load(golden_config(golden_dir), bad)
  one_line_error(e, bad, "'inner.H_init' is int64")
  torch_zip_util.write_state_dict(bad, {**state, "_orig_mod.model.inner.H_init": state["inner.H_init"]})
  with pytest.raises(ValueError) as e:
    init_weights.load(golden_config(golden_dir), bad)
  one_line_error(e, bad, "'inner.H_init' appears twice")


# ---------------------------------------------------------------------------
# Training from a checkpoint in the original's format, end to end.


@pytest.fixture(scope="module")
def sudoku_small(tmp_path_factory):
  from data_prep import sudoku  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("data") / "sudoku"
  sudoku.build_generated(path, num_train=8, num_test=4, num_aug=1, seed=0, target_clues=50)
  return path


def _original_checkpoint(config, path, extra_rows=3):
  """This config's random weights saved as the original saves them, with a puzzle table of another size.

  H_init/L_init are bfloat16 (the original keeps them in its forward dtype),
  rounded first so that their float32 values are exact.
  """
  import jax  # pylint: disable=g-import-not-at-top
  run = runs.setup(config, path.parent / "probe")
  params = jax.tree.map(np.asarray, trm.init_params(run.model, jax.random.key(7)))
  rng = np.random.default_rng(0)
  table = rng.standard_normal((run.model.num_puzzle_identifiers + extra_rows, run.model.puzzle_emb_ndim))
  state = weights.export_state_dict(run.model, params, table.astype(np.float32))
  for name in ("inner.H_init", "inner.L_init"):
    state[name] = ((state[name].view(np.uint32) >> 16) << 16).view(np.float32)
  torch_zip_util.write_state_dict(path, {f"_orig_mod.model.{k}": v for k, v in state.items()},
                                  bfloat16=("_orig_mod.model.inner.H_init", "_orig_mod.model.inner.L_init"))
  return run.model, state


def test_training_starts_from_an_original_checkpoint(sudoku_small, tmp_path, capsys):
  from test_train import final_params, tiny_config  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  # lr 0: the weights stay the loaded ones, so the checkpoint shows what was loaded.
  config = tiny_config(sudoku_small, epochs=2, eval_interval=2, lr=0.0, puzzle_emb_lr=0.0)
  model, state = _original_checkpoint(config, tmp_path / "step_100.pt")
  config.init_weights = str(tmp_path / "step_100.pt")
  summary = train.train_and_evaluate(config, tmp_path / "run")
  assert summary["end_step"] > 0
  out = capsys.readouterr().out
  assert f"note: init_weights {tmp_path / 'step_100.pt'}: the puzzle-embedding table has " in out
  _, saved = final_params(tmp_path / "run")
  blank_table = np.zeros((model.num_puzzle_identifiers, model.puzzle_emb_ndim), np.float32)
  expected_params, _ = weights.import_state_dict(model, {**state, weights.PUZZLE_EMB_NAME: blank_table})
  jax.tree.map(np.testing.assert_array_equal, dict(saved["params"]), expected_params)
  rows = np.asarray(saved["puzzle_emb"])[:model.num_puzzle_identifiers]
  mean = state[weights.PUZZLE_EMB_NAME].astype(np.float64).mean(axis=0)
  np.testing.assert_allclose(rows, np.broadcast_to(mean, rows.shape), rtol=1e-6, atol=1e-7)


def test_a_bad_checkpoint_is_a_one_line_user_error(sudoku_small, tmp_path):
  """A UserError: launch.py prints it as one `error: ...` line (tests/test_train.py checks that path)."""
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  evil = tmp_path / "evil.pt"
  torch_zip_util.write_zip(evil, torch_zip_util.dumps({"w": Call("os", "system", "echo must not run")}))
  other = tmp_path / "other_architecture.pt"
  torch_zip_util.write_state_dict(other, {"_orig_mod.model.inner.H_level.layers.0.mlp.down_proj.weight":
                                          np.zeros((4, 4), np.float32)})
  for path, expected in ((evil, "refused pickle global os.system"), (other, "inner.H_level.layers.0")):
    config = tiny_config(sudoku_small, epochs=2, eval_interval=2, init_weights=str(path))
    with pytest.raises(errors.UserError) as e:
      train.train_and_evaluate(config, tmp_path / f"run_{path.stem}")
    one_line_error(e, path, expected)
    assert isinstance(e.value, errors.UserError)
