r"""Times the ORIGINAL PyTorch TRM's own training step, for ``trm_jax.gpu_verdict``.

  python -m trm_jax.torch_original_step --spec=SPEC.json --out=RESULT.json

Run by the verdict in a child process, with the Python that has torch (on the
GPU image, the same one as JAX; on a CPU, ``/work/venv-torch`` for instance).
It imports nothing of this project and no JAX: only the standard library,
numpy, torch and, at run time, the original's model, loss, sparse-embedding
and EMA modules from a copy of its repository (``spec["orig"]``, e.g. the
git-ignored ``.orig`` that ``tools/prepare_gpu_carry.sh`` makes). Nothing of
the original is copied here.

What one step is, as the original's ``pretrain.py`` (``create_model``,
``train_batch`` and its training loop): the ACT model in its loss head,
``torch.compile``\ d (unless ``spec["compile"]`` is false, like its
``DISABLE_COMPILE``), one forward of the carried batch, ``(loss / B).backward()``,
the sparse SignSGD of the puzzle embedding and AdamATan2, ``zero_grad``, the
metrics stacked and copied to the host (which waits for the step), then the EMA
update when the config has one. The only difference: the ``adam-atan2``
package's fused CUDA update is not installed, so ``AdamATan2`` below writes the
same update (SPEC.md §6) in plain torch ops, one parameter at a time.

Shims: at commit e7b6871 the modules imported here need neither
``flash_attn`` nor ``adam_atan2``; other versions of the original import them at
module level. When such a module cannot be imported, a stand-in is put in
``sys.modules`` first (``flash_attn_func`` through torch's
``scaled_dot_product_attention``; ``adam_atan2.AdamATan2`` as below), and the
result names every stand-in used. The copy itself is never edited.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import time
import traceback
import types
from typing import Any

# The original's module paths this step needs (relative to its checkout).
MODEL_MODULE = "models.recursive_reasoning.trm"
NEEDED_FILES = ("models/recursive_reasoning/trm.py", "models/losses.py", "models/sparse_embedding.py",
                "models/ema.py", "models/layers.py", "models/common.py")


def _write(path: pathlib.Path, result: dict) -> None:
  path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def make_adam_atan2(torch):
  """AdamATan2 (SPEC.md §6) as a torch optimiser: no epsilon, decoupled decay."""

  class AdamATan2(torch.optim.Optimizer):
    """p *= 1 - lr*wd; m, v move toward g, g^2; p -= lr/(1-b1^t) * atan2(m, sqrt(v/(1-b2^t)))."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.95), weight_decay: float = 0.1):
      super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # pylint: disable=unused-argument
      for group in self.param_groups:
        lr, decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        for param in group["params"]:
          grad = param.grad
          if grad is None:
            continue
          slot = self.state[param]
          if not slot:
            slot.update(t=0, m=torch.zeros_like(param), v=torch.zeros_like(param))
          slot["t"] += 1
          first_correction = 1.0 - beta1 ** slot["t"]
          second_correction = 1.0 - beta2 ** slot["t"]
          param.mul_(1.0 - lr * decay)
          slot["m"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
          slot["v"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
          scale = slot["v"].sqrt().div_(math.sqrt(second_correction))
          param.sub_(torch.atan2(slot["m"], scale).mul_(lr / first_correction))

  return AdamATan2


def _install_shims(torch, adam_cls) -> list[str]:
  """Stand-ins for the optional CUDA packages some versions of the original import."""
  used = []

  def flash_attn_func(q, k, v, causal=False, **_):
    # [B, S, H, K] in and out, as flash-attn; torch's attention wants [B, H, S, K].
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)

  for name in ("flash_attn_interface", "flash_attn"):
    if importlib.util.find_spec(name) is None:
      sys.modules[name] = types.SimpleNamespace(flash_attn_func=flash_attn_func, __name__=name)
      used.append(f"{name}.flash_attn_func -> torch scaled_dot_product_attention")
  if importlib.util.find_spec("adam_atan2") is None:
    sys.modules["adam_atan2"] = types.SimpleNamespace(AdamATan2=adam_cls, __name__="adam_atan2")
    used.append("adam_atan2.AdamATan2 -> trm_jax.torch_original_step.AdamATan2 (plain torch)")
  return used


def _orig_commit(orig: pathlib.Path) -> str | None:
  stamp = orig / "COMMIT"
  if stamp.is_file():
    return stamp.read_text().strip()
  try:
    return subprocess.run(["git", "-C", str(orig), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return None


def skip_reason(spec: dict) -> str | None:
  """Why the step cannot run here (torch absent, no copy of the original), or None."""
  if importlib.util.find_spec("torch") is None:
    return f"torch is not importable by {sys.executable}"
  orig = pathlib.Path(spec["orig"])
  missing = [f for f in NEEDED_FILES if not (orig / f).is_file()]
  if missing:
    return (f"no copy of the original at {orig} (missing {missing[0]}); make one with "
            f"tools/prepare_gpu_carry.sh and carry it")
  return None


def run(spec: dict, out: pathlib.Path) -> dict:
  """Builds the original's model and optimisers as its pretrain.py does, then times its step."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  result: dict[str, Any] = {"status": "running", "framework": "torch", "torch": torch.__version__,
                            "spec": spec}
  adam_cls = make_adam_atan2(torch)
  result["stand_ins_installed"] = _install_shims(torch, adam_cls)
  orig = pathlib.Path(spec["orig"]).resolve()
  result["orig_commit"] = _orig_commit(orig)
  sys.path.insert(0, str(orig))
  model_lib = __import__(MODEL_MODULE, fromlist=["TinyRecursiveReasoningModel_ACTV1"])
  losses_lib = __import__("models.losses", fromlist=["ACTLossHead"])
  sparse_lib = __import__("models.sparse_embedding", fromlist=["CastedSparseEmbeddingSignSGD_Distributed"])
  ema_lib = __import__("models.ema", fromlist=["EMAHelper"])

  device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
  result["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  if device == "cpu":
    torch.set_num_threads(int(spec.get("cpu_threads", 2)))
  torch.manual_seed(0)
  batch_size = int(spec["batch"])
  model_cfg = {**spec["model"], "batch_size": batch_size, "causal": False}
  hp = spec["optim"]
  compile_model = bool(spec.get("compile", True))
  with torch.device(device):
    model = model_lib.TinyRecursiveReasoningModel_ACTV1(model_cfg)
    model = losses_lib.ACTLossHead(model, loss_type=spec["loss_type"])
    if compile_model:
      model = torch.compile(model)
  optimizers = [
      (sparse_lib.CastedSparseEmbeddingSignSGD_Distributed(
          model.model.puzzle_emb.buffers(), lr=0, weight_decay=hp["puzzle_emb_weight_decay"], world_size=1),
       hp["puzzle_emb_lr"]),
      (adam_cls(model.parameters(), lr=0, weight_decay=hp["weight_decay"], betas=(hp["beta1"], hp["beta2"])),
       hp["lr"]),
  ] if model_cfg.get("puzzle_emb_ndim", 0) else [
      (adam_cls(model.parameters(), lr=0, weight_decay=hp["weight_decay"], betas=(hp["beta1"], hp["beta2"])),
       hp["lr"])]
  ema = None
  if hp.get("ema"):
    ema = ema_lib.EMAHelper(mu=hp["ema_rate"])
    ema.register(model)

  rng = np.random.default_rng(0)
  seq_len, vocab, num_ids = model_cfg["seq_len"], model_cfg["vocab_size"], model_cfg["num_puzzle_identifiers"]
  batch = {"inputs": torch.from_numpy(rng.integers(0, vocab, (batch_size, seq_len), dtype=np.int32)),
           "labels": torch.from_numpy(rng.integers(0, vocab, (batch_size, seq_len), dtype=np.int32)),
           "puzzle_identifiers": torch.from_numpy(rng.integers(0, num_ids, (batch_size,), dtype=np.int32))}
  batch = {k: v.to(device) for k, v in batch.items()}
  state = {"carry": None, "step": 0}
  model.train()

  def one_step():
    """pretrain.py's train_batch and its loop's EMA update, at a constant learning rate."""
    state["step"] += 1
    if state["carry"] is None:
      with torch.device(device):
        state["carry"] = model.initial_carry(batch)
    state["carry"], loss, metrics, _, _ = model(carry=state["carry"], batch=batch, return_keys=[])
    ((1 / batch_size) * loss).backward()
    for optimizer, lr in optimizers:
      for group in optimizer.param_groups:
        group["lr"] = lr
      optimizer.step()
      optimizer.zero_grad()
    keys = sorted(metrics)
    values = torch.stack([metrics[k] for k in keys]).cpu().numpy()  # the original's per-step host copy
    if ema is not None:
      ema.update(model)
    return dict(zip(keys, values.tolist()))

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  first_metrics = one_step()
  sync()
  result["first_step_s"] = time.perf_counter() - start  # includes torch.compile's work
  for _ in range(int(spec.get("warmup", 2))):
    one_step()
  sync()
  result["compile_and_warmup_s"] = time.perf_counter() - start
  _write(out, result)
  steps = int(spec["steps"])
  start = time.perf_counter()
  for _ in range(steps):
    metrics = one_step()
  sync()
  seconds = (time.perf_counter() - start) / steps
  result.update({
      "status": "ok", "compile": compile_model, "global_batch": batch_size, "seq_len": seq_len,
      "timed_steps": steps, "train_steps_per_s": 1.0 / seconds, "train_tokens_per_s": batch_size * seq_len / seconds,
      "first_metrics": first_metrics, "last_metrics": metrics,
      "optimizer": "AdamATan2 in plain torch (the adam-atan2 CUDA extension is absent)",
      "num_params": sum(p.numel() for p in model.parameters()),
  })
  if device == "cuda":
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    result["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m trm_jax.torch_original_step", description=__doc__.split("\n\n")[0])
  parser.add_argument("--spec", required=True, help="JSON file: orig, model, optim, loss_type, batch, steps, ...")
  parser.add_argument("--out", required=True, help="result JSON file")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  spec = json.loads(pathlib.Path(args.spec).read_text())
  reason = skip_reason(spec)
  if reason:
    _write(out, {"status": "skipped", "reason": reason, "framework": "torch"})
    return 0
  try:
    result = run(spec, out)
  except Exception as e:  # pylint: disable=broad-except
    # A failure of the original's step on this machine is a result to write down.
    failure = {"status": "failed", "framework": "torch", "error": f"{type(e).__name__}: {e}"[:2000],
               "traceback": traceback.format_exc()[-6000:], "spec": spec}
    _write(out, failure)
    if not spec.get("compile", True) or not spec.get("eager_fallback", True):
      return 1
    # torch.compile failed on this stack: time the eager step too, labelled as such.
    try:
      result = run({**spec, "compile": False}, out)
    except Exception:  # pylint: disable=broad-except
      return 1
    result["compile_error"] = failure["error"]
  _write(out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
