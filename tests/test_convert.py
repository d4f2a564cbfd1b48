"""Tests of data_prep.convert: the original .npy layout <-> the trm-jax format."""
import json
import pathlib

import numpy as np
import pytest

from data_prep import arc
from data_prep import common
from data_prep import convert


def _write_original(root: pathlib.Path, seed: int = 0, *, arc_like: bool = False) -> None:
  """A dataset in the original layout, written as the original builders write it."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True)
  seq_len, vocab = (900, 12) if arc_like else (81, 11)
  for split, num_groups in (("train", 5), ("test", 3)):
    (root / split).mkdir()
    group_sizes = rng.integers(1, 4, num_groups)
    puzzle_sizes = rng.integers(1, 5, int(group_sizes.sum()))
    n = int(puzzle_sizes.sum())
    arrays = {
        "inputs": rng.integers(0, vocab, (n, seq_len)).astype(np.uint8),
        "labels": rng.integers(0, vocab, (n, seq_len)).astype(np.uint8),
        "group_indices": np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int32),
        "puzzle_indices": np.concatenate([[0], np.cumsum(puzzle_sizes)]).astype(np.int32),
        "puzzle_identifiers": rng.integers(0, 20, puzzle_sizes.shape[0]).astype(np.int32),
    }
    for k, v in arrays.items():
      np.save(root / split / f"all__{k}.npy", v)
    # The original sudoku builder's metadata: total_puzzles = groups, mean 1 (an int).
    meta = {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": vocab,
            "seq_len": seq_len, "num_puzzle_identifiers": 20, "total_groups": num_groups,
            "mean_puzzle_examples": 1, "total_puzzles": num_groups, "sets": ["all"]}
    with open(root / split / "dataset.json", "w") as f:
      json.dump(meta, f)
  with open(root / "identifiers.json", "w") as f:
    json.dump(["<blank>"] + [f"p{i}" for i in range(1, 20)], f)
  if arc_like:
    with open(root / "test_puzzles.json", "w") as f:
      json.dump({"p1": {"train": [], "test": [{"input": [[1]], "output": [[2]]}]}}, f)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arc_like", [False, True])
def test_round_trip_is_byte_exact(tmp_path, arc_like):
  _write_original(tmp_path / "orig", arc_like=arc_like)
  if arc_like:  # small windows and chunks: many refills
    convert.import_original(tmp_path / "orig", tmp_path / "ours", window_rows=3)
    convert.export_original(tmp_path / "ours", tmp_path / "back", chunk_examples=5)
  else:
    assert convert.main(["import", str(tmp_path / "orig"), str(tmp_path / "ours")]) == 0
    assert convert.main(["export", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
  orig, back = _files(tmp_path / "orig"), _files(tmp_path / "back")
  assert orig.keys() == back.keys()
  for k in orig:
    assert orig[k] == back[k], k
  # And the imported data reads back as the original arrays.
  for split in ("train", "test"):
    info = common.load_split(tmp_path / "ours" / split)
    reader = common.ExampleReader(info, "all")
    inputs, labels = reader[np.arange(len(reader))]
    reader.close()
    assert np.array_equal(inputs, np.load(tmp_path / "orig" / split / "all__inputs.npy"))
    assert np.array_equal(labels, np.load(tmp_path / "orig" / split / "all__labels.npy"))
    s = info.sets["all"]
    for k in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
      assert np.array_equal(getattr(s, k), np.load(tmp_path / "orig" / split / f"all__{k}.npy"))
    assert info.metadata.mean_puzzle_examples == 1 and info.metadata.total_puzzles == info.metadata.total_groups


def test_export_of_an_arc_build_matches_the_original_layout(tmp_path, data_dir):
  prefix = data_dir / "arc" / "arc-agi"
  stats = arc.build_arc_dataset([arc.SubsetFiles.from_prefix(str(prefix), "evaluation")], "evaluation",
                                tmp_path / "ours", num_aug=2, limit_puzzles=3, verbose=False)
  assert convert.main(["export", str(tmp_path / "ours"), str(tmp_path / "orig")]) == 0
  for split in ("train", "test"):
    inputs = np.load(tmp_path / "orig" / split / "all__inputs.npy")
    assert inputs.dtype == np.uint8 and inputs.shape == (stats.examples[split], 900)
    for k in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
      assert np.load(tmp_path / "orig" / split / f"all__{k}.npy").dtype == np.int32
    meta = json.loads((tmp_path / "orig" / split / "dataset.json").read_text())
    assert list(meta) == list(convert.ORIGINAL_METADATA_KEYS)
  # Re-import and re-export: identical.
  assert convert.main(["import", str(tmp_path / "orig"), str(tmp_path / "ours2")]) == 0
  assert convert.main(["export", str(tmp_path / "ours2"), str(tmp_path / "orig2")]) == 0
  assert _files(tmp_path / "orig") == _files(tmp_path / "orig2")


def _fails(capsys, argv, *expected):
  assert convert.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), err
  for e in expected:
    assert str(e) in err[0], (e, err[0])


def test_import_errors_name_the_file(tmp_path, capsys):
  src, dst = tmp_path / "orig", tmp_path / "ours"
  _fails(capsys, ["import", str(src), str(dst)], src, "not found")
  _write_original(src)
  (src / "train" / "all__labels.npy").unlink()
  _fails(capsys, ["import", str(src), str(dst)], src / "train" / "all__labels.npy", "missing")
  (src / "train" / "all__labels.npy").write_bytes(b"not an npy file")
  _fails(capsys, ["import", str(src), str(dst)], "all__labels.npy", "not a readable .npy")
  np.save(src / "train" / "all__labels.npy", np.zeros((3, 81), np.uint8))
  _fails(capsys, ["import", str(src), str(dst)], "inputs", "labels (3, 81)")
  np.save(src / "train" / "all__labels.npy", np.load(src / "train" / "all__inputs.npy"))
  pidx = np.load(src / "train" / "all__puzzle_indices.npy")
  np.save(src / "train" / "all__puzzle_indices.npy", pidx[::-1].copy())
  _fails(capsys, ["import", str(src), str(dst)], "puzzle_indices must rise")
  np.save(src / "train" / "all__puzzle_indices.npy", pidx)
  meta = json.loads((src / "test" / "dataset.json").read_text())
  del meta["seq_len"]
  (src / "test" / "dataset.json").write_text(json.dumps(meta))
  _fails(capsys, ["import", str(src), str(dst)], src / "test" / "dataset.json", "seq_len")
  (src / "test" / "dataset.json").write_text("{")
  _fails(capsys, ["import", str(src), str(dst)], src / "test" / "dataset.json", "invalid JSON")
  assert not dst.exists()


def test_tokens_outside_the_vocabulary(tmp_path, capsys):
  src = tmp_path / "orig"
  _write_original(src)
  x = np.load(src / "test" / "all__inputs.npy")
  x[-1, 0] = 11
  np.save(src / "test" / "all__inputs.npy", x)
  _fails(capsys, ["import", str(src), str(tmp_path / "ours")], "tokens outside [0, 11)")
  assert not (tmp_path / "ours").exists()


def test_export_errors(tmp_path, capsys):
  _write_original(tmp_path / "orig")
  _fails(capsys, ["export", str(tmp_path / "orig"), str(tmp_path / "x")], "not in the trm-jax", "import it")
  assert convert.main(["import", str(tmp_path / "orig"), str(tmp_path / "ours")]) == 0
  capsys.readouterr()
  _fails(capsys, ["import", str(tmp_path / "ours"), str(tmp_path / "y")], "already in the trm-jax format")
  _fails(capsys, ["export", str(tmp_path / "ours"), str(tmp_path / "orig")], "already exists", "--overwrite")
  shard = next((tmp_path / "ours" / "test").glob("*.array_record"))
  shard.unlink()
  _fails(capsys, ["export", str(tmp_path / "ours"), str(tmp_path / "x")], shard.name, "missing")
  assert not (tmp_path / "x").exists()


def test_help(capsys):
  with pytest.raises(SystemExit) as e:
    convert.main(["--help"])
  assert e.value.code == 0 and "import" in capsys.readouterr().out
