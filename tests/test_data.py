"""Tests of the input pipeline (trm_jax.data) on tiny datasets written with DatasetWriter."""
import gc
import json

import numpy as np
import pytest

from data_prep import common
from trm_jax import data
from trm_jax import sampler

SEQ_LEN = 6
VOCAB = 200


def _write_split(writer, split, sets, rng, **finish_kwargs):
  """Writes `sets` ({name: [[puzzle sizes of group] ...]}); returns what was written.

  Example e of a set has inputs[:2] = (e // VOCAB, e % VOCAB) so that a batch row
  tells which example it is; labels are random with many 0s (ignore_label_id).
  """
  written, next_identifier = {}, 1
  for name, groups in sets.items():
    w = writer.set_writer(split, name, SEQ_LEN, VOCAB)
    inputs, labels, identifiers, pidx, gidx = [], [], [], [0], [0]
    for group in groups:
      for size in group:
        e = pidx[-1] + np.arange(size)
        x = rng.integers(0, VOCAB, (size, SEQ_LEN))
        x[:, 0], x[:, 1] = e // VOCAB, e % VOCAB
        y = np.where(rng.random((size, SEQ_LEN)) < 0.3, 0, rng.integers(1, VOCAB, (size, SEQ_LEN)))
        w.add_puzzle(x, y, next_identifier)
        inputs.append(x)
        labels.append(y)
        identifiers.append(next_identifier)
        pidx.append(pidx[-1] + size)
        next_identifier += 1
      w.end_group()
      gidx.append(len(identifiers))
    written[name] = dict(inputs=np.concatenate(inputs), labels=np.concatenate(labels),
                         puzzle_identifiers=np.asarray(identifiers), puzzle_indices=np.asarray(pidx),
                         group_indices=np.asarray(gidx))
  writer.finish_split(split, task="generic", num_puzzle_identifiers=next_identifier, **finish_kwargs)
  return written


def _random_groups(rng, num_groups, max_puzzles, max_examples):
  return [rng.integers(1, max_examples + 1, rng.integers(1, max_puzzles + 1)).tolist()
          for _ in range(num_groups)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """One train set 'all' (9 groups) and a test split with sets 'a' (13 ex.) and 'b' (7 ex.)."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("data") / "tiny"
  with common.DatasetWriter(path, examples_per_shard=7) as w:  # Several shards per set.
    train = _write_split(w, "train", {"all": _random_groups(rng, 9, 3, 4)}, rng)
    test = _write_split(w, "test", {"a": [[4, 3], [6]], "b": [[2], [5]]}, rng, ignore_label_id=None)
  return path, train, test


@pytest.fixture(scope="module")
def two_set_dataset(tmp_path_factory):
  rng = np.random.default_rng(1)
  path = tmp_path_factory.mktemp("data") / "two_sets"
  with common.DatasetWriter(path) as w:
    train = _write_split(w, "train", {"x": _random_groups(rng, 5, 2, 3), "y": _random_groups(rng, 7, 3, 3)}, rng)
  return path, train


def _expected_rows(written, rows, puzzles, ignore_label_id=0):
  labels = written["labels"][rows].astype(np.int32)
  if ignore_label_id is not None:
    labels[labels == ignore_label_id] = -100
  return {"inputs": written["inputs"][rows].astype(np.int32), "labels": labels,
          "puzzle_identifiers": written["puzzle_identifiers"][puzzles].astype(np.int32)}


def _reference_train_batches(written, set_order, *, seed, epochs_per_iter, global_batch_size, num_passes):
  """The original's _iter_train/_sample_batch written out call by call.

  The only change: the examples within a puzzle come from the documented
  per-batch generator instead of the original's global np.random.choice.
  Returns [(pass, set name, rows, puzzles)] for every full batch, and the number
  of examples left in the dropped last batch of every (pass, set).
  """
  batches, dropped, iters = [], [], 0
  for p in range(num_passes):
    for name in set_order:
      d = written[name]
      pidx, gidx = d["puzzle_indices"], d["group_indices"]
      iters += 1
      rng = np.random.Generator(np.random.Philox(seed=seed + iters))
      group_order = np.concatenate([rng.permutation(gidx.size - 1) for _ in range(epochs_per_iter)])
      start, b = 0, 0
      while start < group_order.size:
        entries, current = [], 0
        while start < group_order.size and current < global_batch_size:
          g = group_order[start]
          puzzle = rng.integers(gidx[g], gidx[g + 1])
          start += 1
          size = int(pidx[puzzle + 1] - pidx[puzzle])
          entries.append((puzzle, size, min(size, global_batch_size - current)))
          current += entries[-1][2]
        if current < global_batch_size:
          dropped.append(current)
          break
        keys = np.random.default_rng([seed, iters, b, sampler.EXAMPLE_CHOICE_TAG]).random(sum(e[1] for e in entries))
        rows, puzzles, offset = [], [], 0
        for puzzle, size, take in entries:
          chosen = np.argsort(keys[offset:offset + size], kind="stable")[:take]
          assert len(set(chosen.tolist())) == take
          rows += (pidx[puzzle] + chosen).tolist()
          puzzles += [puzzle] * take
          offset += size
        batches.append((p, name, np.asarray(rows), np.asarray(puzzles)))
        b += 1
  return batches, dropped


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=f"batch {i}, {k}")


def _take(it, n):
  return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------
# Train iterator.


@pytest.mark.parametrize("seed,epochs_per_iter,global_batch_size,num_passes",
                         [(0, 2, 8, 3), (7, 1, 5, 3), (3, 3, 16, 3), (11, 1, 20, 15)])
def test_train_batches_equal_reference(dataset, seed, epochs_per_iter, global_batch_size, num_passes):
  path, train, _ = dataset
  want, dropped = _reference_train_batches(train, ["all"], seed=seed, epochs_per_iter=epochs_per_iter,
                                           global_batch_size=global_batch_size, num_passes=num_passes)
  it = data.make_train_iterator(path, global_batch_size=global_batch_size, seed=seed,
                                epochs_per_iter=epochs_per_iter, num_passes=num_passes)
  got = list(it)
  _assert_batches_equal(got, [_expected_rows(train["all"], rows, puzzles) for _, _, rows, puzzles in want])
  for p in range(num_passes):
    assert it.batches_in_pass(p) == sum(w[0] == p for w in want)
  assert any(d > 0 for d in dropped)  # Some pass had an incomplete last batch, dropped.
  for b in got:  # Static shapes and dtypes.
    assert b["inputs"].shape == b["labels"].shape == (global_batch_size, SEQ_LEN)
    assert b["puzzle_identifiers"].shape == (global_batch_size,)
    assert all(v.dtype == np.int32 for v in b.values())


def test_train_two_sets_follow_the_original_counter(two_set_dataset):
  path, train = two_set_dataset
  want, _ = _reference_train_batches(train, ["x", "y"], seed=4, epochs_per_iter=2, global_batch_size=6,
                                     num_passes=2)
  got = list(data.make_train_iterator(path, global_batch_size=6, seed=4, epochs_per_iter=2, num_passes=2))
  _assert_batches_equal(got, [_expected_rows(train[name], rows, puzzles) for _, name, rows, puzzles in want])


@pytest.fixture(scope="module")
def two_directories(tmp_path_factory):
  """Two datasets with sets x and y of the same puzzle counts (so that they may train together)."""
  groups_rng = np.random.default_rng(2)
  groups = {"x": _random_groups(groups_rng, 4, 2, 3), "y": _random_groups(groups_rng, 5, 3, 3)}
  written = []
  for i in range(2):
    path = tmp_path_factory.mktemp("data") / f"dir{i}"
    with common.DatasetWriter(path) as w:
      rng = np.random.default_rng(10 + i)
      written.append((path, _write_split(w, "train", groups, rng), _write_split(w, "test", {"t": [[3], [2, 2]]}, rng)))
  return written


def test_several_directories_train_as_the_original_merges_them(two_directories):
  """The original's data_paths: sets x, x1, y, y1 (set by set, directory by directory), one counter."""
  (a, train_a, _), (b, train_b, _) = two_directories
  info = data.load_dataset_info([a, b], "train")
  single = data.load_dataset_info(a, "train")
  assert info.metadata.sets == ["x", "x1", "y", "y1"]
  assert info.metadata.num_puzzle_identifiers == 2 * single.metadata.num_puzzle_identifiers
  assert info.metadata.total_groups == 2 * single.metadata.total_groups
  assert info.metadata.total_puzzles == 2 * single.metadata.total_puzzles
  merged = {"x": train_a["x"], "x1": train_b["x"], "y": train_a["y"], "y1": train_b["y"]}
  want, _ = _reference_train_batches(merged, ["x", "x1", "y", "y1"], seed=5, epochs_per_iter=2,
                                     global_batch_size=4, num_passes=2)
  got = list(data.make_train_iterator([a, b], global_batch_size=4, seed=5, epochs_per_iter=2, num_passes=2))
  _assert_batches_equal(got, [_expected_rows(merged[name], rows, puzzles) for _, name, rows, puzzles in want])
  # One directory in a list is that directory.
  assert data.load_dataset_info([a], "train").metadata == single.metadata


def test_several_directories_test_split(two_directories):
  (a, _, test_a), (b, _, test_b) = two_directories
  items = list(data.make_test_iterator([a, b], global_batch_size=8))
  assert [(i.set_name, i.num_examples) for i in items] == [("t", 7), ("t1", 7)]
  np.testing.assert_array_equal(items[1].batch["inputs"][:7], test_b["t"]["inputs"])


def test_directories_that_disagree_cannot_merge(two_directories, dataset):
  (a, _, _), _ = two_directories
  other, _, _ = dataset
  with pytest.raises(common.DatasetFormatError,
                     match=rf"^datasets {a} and {other} cannot train together: sets is \['x', 'y'\] in the first "
                           r"and \['all'\] in the second"):
    data.load_dataset_info([a, other], "train")


def test_train_sampler_properties(dataset):
  path, train, _ = dataset
  d = train["all"]
  num_groups = d["group_indices"].size - 1
  bs, epochs = 8, 3
  it = data.make_train_iterator(path, global_batch_size=bs, seed=1, epochs_per_iter=epochs)
  pid_to_puzzle = {int(p): i for i, p in enumerate(d["puzzle_identifiers"])}
  # Group order: every epoch of a pass visits every group once, in the order
  # the batches hold (the visited positions stop at the dropped last batch).
  for p in range(3):
    (segment,) = it._sampler.pass_plan(p)
    groups = np.searchsorted(d["group_indices"], segment.picks, side="right") - 1
    for e in range(0, groups.size, num_groups):
      chunk = groups[e:e + num_groups]
      assert np.unique(chunk).size == chunk.size
    assert num_groups * (epochs - 1) < groups.size <= num_groups * epochs
  mixed = False
  for _ in range(3 * it.batches_in_pass(0)):
    b = next(it)
    example = b["inputs"][:, 0] * VOCAB + b["inputs"][:, 1]
    puzzles = np.asarray([pid_to_puzzle[int(i)] for i in b["puzzle_identifiers"]])
    # Every row is an example of its puzzle, with its labels (0 -> -100).
    assert np.all((d["puzzle_indices"][puzzles] <= example) & (example < d["puzzle_indices"][puzzles + 1]))
    want_labels = np.where(d["labels"][example] == 0, -100, d["labels"][example])
    np.testing.assert_array_equal(b["labels"], want_labels)
    mixed |= np.unique(puzzles).size > 1
  assert mixed


def test_train_each_puzzle_draw_has_distinct_examples(dataset):
  path, _, _ = dataset
  # One epoch per pass: a group (hence a puzzle) is drawn at most once per pass,
  # so the rows of one puzzle within a batch all come from one draw.
  it = data.make_train_iterator(path, global_batch_size=8, seed=2, epochs_per_iter=1, num_passes=6)
  num_batches = 0
  for b in it:
    example = b["inputs"][:, 0] * VOCAB + b["inputs"][:, 1]
    for ident in np.unique(b["puzzle_identifiers"]):
      rows = example[b["puzzle_identifiers"] == ident]
      assert np.unique(rows).size == rows.size
    num_batches += 1
  assert num_batches == sum(it.batches_in_pass(p) for p in range(6))


def test_train_deterministic_and_seeded(dataset):
  path, _, _ = dataset
  kw = dict(global_batch_size=8, epochs_per_iter=2)
  a = _take(data.make_train_iterator(path, seed=3, **kw), 25)
  b = _take(data.make_train_iterator(path, seed=3, **kw), 25)
  c = _take(data.make_train_iterator(path, seed=4, **kw), 25)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_train_process_slices_concatenate_to_global_batch(dataset):
  path, _, _ = dataset
  kw = dict(global_batch_size=8, seed=5, epochs_per_iter=2)
  whole = _take(data.make_train_iterator(path, **kw), 20)
  parts = [_take(data.make_train_iterator(path, process_index=i, process_count=4, **kw), 20) for i in range(4)]
  for step, w in enumerate(whole):
    for k in w:
      assert parts[0][step][k].shape[0] == 2
      np.testing.assert_array_equal(np.concatenate([p[step][k] for p in parts]), w[k])
  with pytest.raises(ValueError, match="not divisible by the process count 3"):
    data.make_train_iterator(path, process_index=0, process_count=3, **kw)
  with pytest.raises(ValueError, match="process_index"):
    data.make_train_iterator(path, process_index=4, process_count=4, **kw)


def test_train_position_and_num_passes(dataset):
  path, _, _ = dataset
  it = data.make_train_iterator(path, global_batch_size=8, seed=6, epochs_per_iter=1, num_passes=2)
  n0, n1 = it.batches_in_pass(0), it.batches_in_pass(1)
  positions = []
  for _ in it:
    positions.append((it.pass_index, it.batch_index))
  assert len(positions) == n0 + n1
  assert positions[n0 - 1] == (1, 0)  # After the last batch of pass 0.
  assert positions[-1] == (2, 0)


def test_train_resume_in_process(dataset):
  path, _, _ = dataset
  kw = dict(global_batch_size=8, seed=8, epochs_per_iter=2)
  whole = _take(data.make_train_iterator(path, **kw), 40)
  first = data.make_train_iterator(path, **kw)
  _take(first, 17)
  assert first.pass_index > 0  # The resume point lies after a pass boundary.
  state = json.loads(json.dumps(first.get_state()))
  resumed = data.make_train_iterator(path, **kw)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 23), whole[17:])
  # Going back on a used iterator works too.
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 2), whole[17:19])


def test_train_resume_with_workers_equals_uninterrupted(dataset):
  path, _, _ = dataset
  kw = dict(global_batch_size=8, seed=9, epochs_per_iter=2)
  whole = _take(data.make_train_iterator(path, **kw), 14)
  with data.make_train_iterator(path, num_workers=2, prefetch=2, **kw) as it:
    _assert_batches_equal(_take(it, 6), whole[:6])
    state = it.get_state()
  with data.make_train_iterator(path, num_workers=1, prefetch=2, **kw) as it:
    it.set_state(state)
    _assert_batches_equal(_take(it, 8), whole[6:])
  gc.collect()  # Drops grain's shared-memory arrays now rather than at exit.


def test_train_state_from_other_config_rejected(dataset, two_set_dataset):
  path, _, _ = dataset
  kw = dict(global_batch_size=8, seed=1, epochs_per_iter=2)
  it = data.make_train_iterator(path, **kw)
  next(it)
  state = it.get_state()
  for other, field in [(dict(kw, global_batch_size=4), "global_batch_size"), (dict(kw, seed=2), "seed"),
                       (dict(kw, epochs_per_iter=1), "epochs_per_iter"),
                       (dict(kw, process_count=2), "process_count")]:
    with pytest.raises(ValueError, match=field):
      data.make_train_iterator(path, **other).set_state(state)
  with pytest.raises(ValueError, match="dataset"):
    data.make_train_iterator(two_set_dataset[0], global_batch_size=4, seed=1, epochs_per_iter=2).set_state(
        dict(state, global_batch_size=4))
  with pytest.raises(ValueError, match="not a train iterator state"):
    it.set_state({"pass": 0, "batch": 0})
  with pytest.raises(ValueError, match="position"):
    it.set_state(dict(state, batch=10**6))
  it.set_state(state)  # A matching state is accepted (also by another process).
  data.make_train_iterator(path, process_index=1, process_count=2, **kw).set_state(dict(state, process_count=2))


def test_batch_size_larger_than_a_pass_is_an_error(dataset):
  path, train, _ = dataset
  total = train["all"]["inputs"].shape[0]
  with pytest.raises(ValueError, match="larger than one pass"):
    data.make_train_iterator(path, global_batch_size=4 * total, seed=0, epochs_per_iter=1)
  with pytest.raises(ValueError, match="positive integer"):
    data.make_train_iterator(path, global_batch_size=0, seed=0, epochs_per_iter=1)


def test_ignore_label_none_keeps_labels(tmp_path):
  rng = np.random.default_rng(3)
  with common.DatasetWriter(tmp_path / "d") as w:
    written = _write_split(w, "train", {"all": [[2], [3]]}, rng, ignore_label_id=None)
  b = next(data.make_train_iterator(tmp_path / "d", global_batch_size=2, seed=0, epochs_per_iter=1))
  example = b["inputs"][:, 0] * VOCAB + b["inputs"][:, 1]
  np.testing.assert_array_equal(b["labels"], written["all"]["labels"][example])


# ---------------------------------------------------------------------------
# Test iterator.


def _expected_test_batches(written, global_batch_size, process_index=0, process_count=1):
  local = global_batch_size // process_count
  out = []
  for name, d in written.items():
    n = d["inputs"].shape[0]
    for start in range(0, n, global_batch_size):
      end = min(start + global_batch_size, n)
      lo = min(start + process_index * local, end)
      rows = np.arange(lo, min(lo + local, end))
      puzzles = np.searchsorted(d["puzzle_indices"], rows, side="right") - 1
      want = _expected_rows(d, rows, puzzles, ignore_label_id=None)
      pad = local - rows.size
      want["inputs"] = np.pad(want["inputs"], ((0, pad), (0, 0)), constant_values=0)
      want["labels"] = np.pad(want["labels"], ((0, pad), (0, 0)), constant_values=-100)
      want["puzzle_identifiers"] = np.pad(want["puzzle_identifiers"], (0, pad), constant_values=0)
      out.append((name, want, end - start))
  return out


@pytest.mark.parametrize("global_batch_size,process_count", [(4, 1), (4, 2), (6, 3), (32, 1)])
def test_test_iterator_order_padding_and_counts(dataset, global_batch_size, process_count):
  path, _, test = dataset
  for process_index in range(process_count):
    it = data.make_test_iterator(path, global_batch_size=global_batch_size, process_index=process_index,
                                 process_count=process_count)
    want = _expected_test_batches(test, global_batch_size, process_index, process_count)
    assert len(it) == len(want)
    got = list(it)
    assert [(g.set_name, g.num_examples) for g in got] == [(w[0], w[2]) for w in want]
    _assert_batches_equal([g.batch for g in got], [w[1] for w in want])
  if (global_batch_size, process_count) == (4, 1):
    assert [g.num_examples for g in got] == [4, 4, 4, 1, 4, 3]


def test_test_iterator_with_workers(dataset):
  path, _, test = dataset
  with data.make_test_iterator(path, global_batch_size=4, num_workers=2, prefetch=1) as it:
    got = list(it)
  want = _expected_test_batches(test, 4)
  assert [(g.set_name, g.num_examples) for g in got] == [(w[0], w[2]) for w in want]
  _assert_batches_equal([g.batch for g in got], [w[1] for w in want])
  gc.collect()


# ---------------------------------------------------------------------------
# Bad dataset directories.


def test_bad_dataset_directories(tmp_path, dataset):
  kw = dict(global_batch_size=4, seed=0, epochs_per_iter=1)
  with pytest.raises(common.DatasetFormatError, match="does not exist"):
    data.make_train_iterator(tmp_path / "nothing", **kw)
  with pytest.raises(common.DatasetFormatError, match="does not exist"):
    data.make_train_iterator(dataset[0], split="validation", **kw)
  (tmp_path / "bad" / "train").mkdir(parents=True)
  with pytest.raises(common.DatasetFormatError, match="dataset.json: missing"):
    data.make_train_iterator(tmp_path / "bad", **kw)
  (tmp_path / "bad" / "train" / "dataset.json").write_text("{not json")
  with pytest.raises(common.DatasetFormatError, match="invalid JSON"):
    data.make_train_iterator(tmp_path / "bad", **kw)
  (tmp_path / "bad" / "train" / "dataset.json").write_text(json.dumps({"seq_len": 3}))
  with pytest.raises(common.DatasetFormatError, match="missing field"):
    data.make_test_iterator(tmp_path / "bad", split="train", global_batch_size=4)


@pytest.mark.parametrize("damage,message", [
    ("no_num_shards", "num_shards"), ("bad_token_dtype", "token_dtype"), ("bad_index", "readable .npz"),
    ("missing_shard", "missing example shard"), ("wrong_record_count", "records in its shards"),
    ("empty_group", "group_indices must increase")])
def test_damaged_dataset_errors(tmp_path, damage, message):
  rng = np.random.default_rng(4)
  path = tmp_path / "d"
  with common.DatasetWriter(path) as w:
    _write_split(w, "train", {"all": [[2, 1], [3]]}, rng)
  split = path / "train"
  meta = json.loads((split / "dataset.json").read_text())
  if damage == "no_num_shards":
    del meta["trm_jax"]["num_shards"]
  elif damage == "bad_token_dtype":
    meta["trm_jax"]["token_dtype"] = "float"
  elif damage == "bad_index":
    (split / common.index_name("all")).write_bytes(b"not an npz")
  elif damage == "missing_shard":
    (split / common.shard_name("all", 0, 1)).unlink()
  elif damage == "wrong_record_count":
    meta["trm_jax"]["num_examples"]["all"] = 7
    index = dict(np.load(split / common.index_name("all")))
    index["puzzle_indices"][-1] = 7
    np.savez(split / common.index_name("all"), **index)
  elif damage == "empty_group":
    index = dict(np.load(split / common.index_name("all")))
    index["group_indices"] = np.asarray([0, 2, 2, 3])
    np.savez(split / common.index_name("all"), **index)
  (split / "dataset.json").write_text(json.dumps(meta))
  with pytest.raises(common.DatasetFormatError, match=message):
    next(data.make_train_iterator(path, global_batch_size=2, seed=0, epochs_per_iter=1))
