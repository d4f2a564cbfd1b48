"""The model against the original's numbers (tests/golden) and the golden CLI."""

import numpy as np
import pytest

import golden_util
import shared_paths
from trm_jax import golden
from trm_jax.models import trm


@pytest.mark.parametrize("path", shared_paths.MODEL_GOLDEN_FILES, ids=lambda p: p.name)
def test_model_matches_original(path):
  report = golden.check_file(path)
  assert report.ok, report.line(path.name)
  # Every kind of check ran: eval trajectory, train0 with gradients, train
  # trajectory, and the bfloat16 drift bound (the files that record it).
  quantities = ["eval.logits", "eval.q", "eval.carry", "eval.loss", "train0.loss", "grad", "grad.puzzle_emb",
                "traj.q", "traj.loss"]
  if "eval_bf16/0/logits" in golden.GoldenFile(path):
    quantities.append("bf16.logits")
  for quantity in quantities:
    assert quantity in report.errors, quantity


@pytest.mark.parametrize("path", shared_paths.MODEL_GOLDEN_FILES, ids=lambda p: p.name)
def test_model_with_pallas_kernels_matches_original(path):
  """The whole model through the Pallas kernels (interpret mode here), same tolerances."""
  report = golden.check_file(path, kernels="pallas")
  assert report.ok, report.line(path.name)
  assert "grad" in report.errors and "traj.q" in report.errors


def test_shared_model_files_present():
  names = {p.name for p in shared_paths.MODEL_GOLDEN_FILES}
  assert {"trm_attn_rope.npz", "trm_mlp_t.npz", "trm_attn_learned.npz", "arch_trm_singlez.npz",
          "arch_trm_hier6.npz", "arch_hrm.npz", "arch_transformers_baseline.npz"} <= names


def test_adam_atan2_file(capsys):
  assert golden.main([str(shared_paths.GOLDEN_DIR / "adam_atan2.npz")]) == 0
  line = capsys.readouterr().out
  assert "adam_atan2.npz: OK" in line and "params.float64" in line and "params.float32" in line


def test_adam_atan2_file_errors(tmp_path):
  data = dict(np.load(shared_paths.GOLDEN_DIR / "adam_atan2.npz"))
  del data["grad3"]
  np.savez(tmp_path / "adam.npz", **data)
  with pytest.raises(golden.GoldenFormatError, match="grad3"):
    golden.check_file(tmp_path / "adam.npz")


def test_stablemax_file():
  report = golden.check_file(shared_paths.GOLDEN_DIR / "stablemax_ce.npz")
  assert report.ok, report.line("stablemax_ce.npz")


SYNTHETIC_CONFIGS = {
    # Configurations the shared files do not cover.
    "nopos_noemb_continue": dict(pos_encodings="none", puzzle_emb_ndim=0, puzzle_emb_len=0,
                                 no_ACT_continue=False, H_cycles=1, L_cycles=2, halt_max_steps=3),
    "rope_prefix_softmax": dict(pos_encodings="rope", puzzle_emb_ndim=24, puzzle_emb_len=0,
                                loss_type="softmax_cross_entropy", H_cycles=2, L_cycles=1,
                                halt_max_steps=2, num_heads=4),
}


@pytest.fixture(scope="module", params=sorted(SYNTHETIC_CONFIGS))
def synthetic_file(request, tmp_path_factory):
  base = dict(seq_len=6, vocab_size=5, num_puzzle_identifiers=4, hidden_size=16, num_heads=2, expansion=2.0,
              L_layers=1, forward_dtype="float32", halt_exploration_prob=0.0)
  config = trm.TRMConfig(**{**base, **SYNTHETIC_CONFIGS[request.param]})
  path = tmp_path_factory.mktemp("golden") / f"{request.param}.npz"
  golden_util.make_model_file(path, config, batch_size=3, seed=1)
  return path


def test_cli_on_other_configurations(synthetic_file, capsys):
  assert golden.main([str(synthetic_file)]) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith(f"{synthetic_file.name}: OK"), line


def _rewrite(src, dst, edit):
  data = dict(np.load(src))
  edit(data)
  np.savez(dst, **data)
  return dst


def test_cli_fails_on_wrong_numbers(synthetic_file, tmp_path, capsys):
  def perturb(data):
    name = next(k for k in data if k.startswith("param/") and "mlp.down_proj" in k)
    data[name] = data[name] * 1.01
  bad = _rewrite(synthetic_file, tmp_path / "bad.npz", perturb)
  assert golden.main([str(bad)]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_missing_key_is_named(synthetic_file, tmp_path, capsys):
  bad = _rewrite(synthetic_file, tmp_path / "missing.npz", lambda d: d.pop("eval/1/z_H"))
  with pytest.raises(golden.GoldenFormatError, match=r"missing key 'eval/1/z_H'"):
    golden.check_file(bad)
  assert golden.main([str(bad)]) == 1
  assert "ERROR" in capsys.readouterr().out


def test_wrong_shape_is_named(synthetic_file, tmp_path):
  def reshape(data):
    data["param/inner.lm_head.weight"] = data["param/inner.lm_head.weight"][:, :-1]
  bad = _rewrite(synthetic_file, tmp_path / "shape.npz", reshape)
  with pytest.raises(golden.GoldenFormatError, match=r"inner\.lm_head\.weight.*shape"):
    golden.check_file(bad)


def test_not_a_golden_file(tmp_path):
  path = tmp_path / "other.npz"
  np.savez(path, something=np.zeros(3))
  with pytest.raises(golden.GoldenFormatError, match="not a golden file"):
    golden.check_file(path)
  with pytest.raises(golden.GoldenFormatError, match="no such file"):
    golden.check_file(tmp_path / "absent.npz")
