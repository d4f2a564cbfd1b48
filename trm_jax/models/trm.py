"""TRM: the input embedding, the heads and the recursion (SPEC §1–§3).

``TRMNetwork`` is a Flax module holding every dense parameter. The puzzle
embedding table is *not* one of them: it has its own optimiser (sparse
SignSGD), is sharded by rows, and is far larger than the network (about 900k x
512 for ARC), so the caller gathers the rows of the batch and passes them in.

``recursion`` is the pure function of one supervision step: ``H_cycles - 1``
cycles under ``stop_gradient`` and one with gradient, each cycle
``L_cycles`` latent updates and one answer update, as ``jax.lax.scan`` loops
(unrolled when short, see ``MAX_UNROLLED_CYCLES``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from trm_jax import ops
from trm_jax.models import layers

POS_ENCODINGS = ("rope", "learned", "none")
FORWARD_DTYPES = ("float32", "bfloat16")
LOSS_TYPES = ("stablemax_cross_entropy", "softmax_cross_entropy")
# What the backward pass recomputes instead of storing (numbers unchanged):
# "none"; "attention": each attention op's internals (with kernels="xla", the
# [B, H, S, S] softmax); "network": everything inside each application of f,
# of which only the inputs are kept.
REMAT_POLICIES = ("none", "attention", "network")
# Cycle loops up to this long are unrolled in the compiled program: XLA then
# schedules and fuses across cycles, and the graded cycle's backward reads
# each application's saved activations directly instead of stacking them in
# scan buffers (copies). Longer loops stay rolled, to bound compile time.
MAX_UNROLLED_CYCLES = 8


def _unroll(length: int) -> int | bool:
  return True if length <= MAX_UNROLLED_CYCLES else 1


@dataclasses.dataclass(frozen=True)
class TRMConfig:
  """Model configuration, with the original's names (SPEC §10 defaults)."""
  seq_len: int
  vocab_size: int
  num_puzzle_identifiers: int
  hidden_size: int = 512
  num_heads: int = 8
  expansion: float = 4.0
  L_layers: int = 2
  H_layers: int = 0  # Unused by TRM (one network serves both levels); kept for config parity.
  H_cycles: int = 3
  L_cycles: int = 6
  pos_encodings: str = "rope"
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  puzzle_emb_ndim: int = 512
  puzzle_emb_len: int = 16
  mlp_t: bool = False
  halt_max_steps: int = 16
  halt_exploration_prob: float = 0.1
  no_ACT_continue: bool = True
  forward_dtype: str = "bfloat16"
  loss_type: str = "stablemax_cross_entropy"
  kernels: str = "xla"
  remat: str = "none"

  def __post_init__(self):
    def fail(field, expected):
      raise ValueError(f"model config: {field}={getattr(self, field)!r}: expected {expected}")
    for field in ("seq_len", "vocab_size", "num_puzzle_identifiers", "hidden_size", "num_heads",
                  "L_layers", "H_cycles", "L_cycles", "halt_max_steps"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        fail(field, "a positive integer")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model config: hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.pos_encodings not in POS_ENCODINGS:
      fail("pos_encodings", f"one of {POS_ENCODINGS}")
    if self.pos_encodings == "rope" and self.head_dim % 2:
      raise ValueError(f"model config: pos_encodings='rope' needs an even head dim "
                       f"(hidden_size / num_heads = {self.head_dim})")
    if self.puzzle_emb_ndim < 0:
      fail("puzzle_emb_ndim", "an integer >= 0")
    if self.puzzle_emb_len < 0:
      fail("puzzle_emb_len", "an integer >= 0")
    if self.puzzle_emb_ndim > self.puzzle_emb_prefix_len * self.hidden_size:
      raise ValueError(
          f"model config: puzzle_emb_ndim={self.puzzle_emb_ndim} does not fit in "
          f"puzzle_emb_len * hidden_size = {self.puzzle_emb_len} * {self.hidden_size}")
    if self.forward_dtype not in FORWARD_DTYPES:
      fail("forward_dtype", f"one of {FORWARD_DTYPES}")
    if self.loss_type not in LOSS_TYPES:
      fail("loss_type", f"one of {LOSS_TYPES}")
    if not 0.0 <= self.halt_exploration_prob <= 1.0:
      fail("halt_exploration_prob", "a probability in [0, 1]")
    if self.expansion <= 0:
      fail("expansion", "a positive number")
    ops.check_impl(self.kernels)
    if self.remat not in REMAT_POLICIES:
      fail("remat", f"one of {REMAT_POLICIES}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def puzzle_emb_prefix_len(self) -> int:
    """P: ``puzzle_emb_len`` if non-zero, else ceil(puzzle_emb_ndim / hidden_size)."""
    if self.puzzle_emb_len:
      return self.puzzle_emb_len
    return -(-self.puzzle_emb_ndim // self.hidden_size)

  @property
  def num_positions(self) -> int:
    """S + P, the length of the carry's sequence axis."""
    return self.seq_len + self.puzzle_emb_prefix_len

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.forward_dtype)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> "TRMConfig":
    """Builds a config from a mapping, ignoring keys that are not model fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in kwargs]
    if missing:
      raise ValueError(f"{source}: missing model field(s) {missing}")
    return cls(**kwargs)

  @classmethod
  def from_json(cls, text: str, *, source: str = "config_json") -> "TRMConfig":
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{source}: invalid JSON ({e})") from None
    return cls.from_dict(d, source=source)


class TRMNetwork(nn.Module):
  """Every dense parameter of TRM, with methods for each stage of a step."""
  config: TRMConfig

  def setup(self):
    c = self.config
    d = c.hidden_size
    embed_init = layers.trunc_normal(1.0 / math.sqrt(d))
    self.embed_tokens = self.param("embed_tokens", embed_init, (c.vocab_size, d))
    if c.pos_encodings == "learned":
      self.embed_pos = self.param("embed_pos", embed_init, (c.num_positions, d))
    self.lm_head = self.param("lm_head", layers.lecun_trunc_normal(d), (d, c.vocab_size))
    # The Q head starts at "never halt": zero weight, bias -5.
    self.q_head_kernel = self.param("q_head_kernel", nn.initializers.zeros, (d, 2))
    self.q_head_bias = self.param("q_head_bias", nn.initializers.constant(-5.0), (2,))
    # Fixed initial states; never trained (stop_gradient at use, frozen in the optimiser).
    self.H_init = self.param("H_init", layers.trunc_normal(1.0), (d,))
    self.L_init = self.param("L_init", layers.trunc_normal(1.0), (d,))
    self.L_level = layers.ReasoningModule(
        num_layers=c.L_layers, hidden_size=d, num_heads=c.num_heads, expansion=c.expansion,
        mlp_t=c.mlp_t, num_positions=c.num_positions, rms_norm_eps=c.rms_norm_eps, kernels=c.kernels,
        remat_attention=c.remat == "attention")

  def embed(self, inputs_BxS: jax.Array, puzzle_rows_BxE: jax.Array | None) -> jax.Array:
    """Token embeddings with the puzzle-embedding prefix: ``[B, S+P, D]`` in the forward dtype."""
    c = self.config
    dtype = c.dtype
    batch = inputs_BxS.shape[0]
    p, d = c.puzzle_emb_prefix_len, c.hidden_size
    emb_BxSxD = jnp.take(self.embed_tokens.astype(dtype), inputs_BxS.astype(jnp.int32), axis=0)
    if p:
      if c.puzzle_emb_ndim:
        rows = puzzle_rows_BxE.astype(dtype)
        prefix = jnp.pad(rows, ((0, 0), (0, p * d - c.puzzle_emb_ndim))).reshape(batch, p, d)
      else:
        prefix = jnp.zeros((batch, p, d), dtype)
      emb_BxSxD = jnp.concatenate([prefix, emb_BxSxD], axis=1)
    if c.pos_encodings == "learned":
      # 1/sqrt(2) keeps the scale of the sum of two unit-variance embeddings.
      emb_BxSxD = 0.707106781 * (emb_BxSxD + self.embed_pos.astype(dtype))
    return (math.sqrt(d) * emb_BxSxD).astype(dtype)

  def reason(self, h_BxSxD: jax.Array, inj_BxSxD: jax.Array,
             cos_SxK: jax.Array | None, sin_SxK: jax.Array | None) -> jax.Array:
    """The one network ``f(h, inj)``."""
    return self.L_level(h_BxSxD, inj_BxSxD, cos_SxK, sin_SxK)

  def heads(self, z_H_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``logits [B, S, V]`` (prefix dropped) and ``q [B, 2]`` (float32)."""
    dtype = z_H_BxSxD.dtype
    p = self.config.puzzle_emb_prefix_len
    logits_BxSxV = jnp.dot(z_H_BxSxD[:, p:], self.lm_head.astype(dtype))
    q_Bx2 = jnp.dot(z_H_BxSxD[:, 0], self.q_head_kernel.astype(dtype)) + self.q_head_bias.astype(dtype)
    return logits_BxSxV, q_Bx2.astype(jnp.float32)

  def initial_states(self) -> tuple[jax.Array, jax.Array]:
    dtype = self.config.dtype
    return (jax.lax.stop_gradient(self.H_init).astype(dtype),
            jax.lax.stop_gradient(self.L_init).astype(dtype))

  def __call__(self, inputs_BxS, puzzle_rows_BxE):
    """Touches every parameter (used by ``init``): one application of each stage."""
    cos, sin = self.rope()
    x = self.embed(inputs_BxS, puzzle_rows_BxE)
    h_init, _ = self.initial_states()
    z = self.reason(jnp.broadcast_to(h_init, x.shape), x, cos, sin)
    return self.heads(z)

  def rope(self) -> tuple[jax.Array | None, jax.Array | None]:
    c = self.config
    if c.pos_encodings != "rope":
      return None, None
    return layers.rope_tables(c.num_positions, c.head_dim, c.rope_theta)


def init_params(config: TRMConfig, rng: jax.Array) -> dict[str, Any]:
  """Initial dense parameters (SPEC §2), float32."""
  inputs = jnp.zeros((1, config.seq_len), jnp.int32)
  rows = jnp.zeros((1, config.puzzle_emb_ndim), jnp.float32) if config.puzzle_emb_ndim else None
  return TRMNetwork(config).init(rng, inputs, rows)["params"]


def init_puzzle_emb(config: TRMConfig) -> jax.Array:
  """The puzzle embedding table ``[num_puzzle_identifiers, puzzle_emb_ndim]``, zero init."""
  return jnp.zeros((config.num_puzzle_identifiers, config.puzzle_emb_ndim), jnp.float32)


def recursion(config: TRMConfig, params: Mapping[str, Any], z_H_BxSxD: jax.Array, z_L_BxSxD: jax.Array,
              inputs_BxS: jax.Array, puzzle_rows_BxE: jax.Array | None
              ) -> tuple[tuple[jax.Array, jax.Array], jax.Array, jax.Array]:
  """One supervision step (SPEC §3).

  Returns ``((z_H, z_L), logits [B, S, V], q [B, 2])``; the returned carry is
  under ``stop_gradient``. Gradients reach ``params`` and ``puzzle_rows`` only
  through the last H cycle.
  """
  net = TRMNetwork(config)

  def apply(p, method, *args):
    return net.apply({"params": p}, *args, method=method)

  def reason(p, z, inj, cos, sin):
    return apply(p, TRMNetwork.reason, z, inj, cos, sin)
  if config.remat == "network":
    # The graded cycle then keeps only each call's inputs for the backward pass.
    reason = jax.checkpoint(reason)

  def run_cycles(p, x_BxSxD, cos, sin, z_H, z_L):
    """One H cycle: L_cycles latent updates, then one answer update."""
    def latent_update(z_L, _):
      return reason(p, z_L, z_H + x_BxSxD, cos, sin), None
    z_L, _ = jax.lax.scan(latent_update, z_L, None, length=config.L_cycles, unroll=_unroll(config.L_cycles))
    z_H = reason(p, z_H, z_L, cos, sin)
    return z_H, z_L

  cos, sin = apply(params, TRMNetwork.rope)
  x_BxSxD = apply(params, TRMNetwork.embed, inputs_BxS, puzzle_rows_BxE)
  dtype = config.dtype
  z_H, z_L = z_H_BxSxD.astype(dtype), z_L_BxSxD.astype(dtype)
  if config.H_cycles > 1:
    # No gradient here: stopping it at the inputs (not only the outputs) keeps
    # autodiff from even tracing these cycles.
    params_ng, x_ng = jax.lax.stop_gradient((params, x_BxSxD))

    def no_grad_cycle(carry, _):
      return run_cycles(params_ng, x_ng, cos, sin, *carry), None
    (z_H, z_L), _ = jax.lax.scan(no_grad_cycle, (z_H, z_L), None, length=config.H_cycles - 1,
                                 unroll=_unroll(config.H_cycles - 1))
    z_H, z_L = jax.lax.stop_gradient((z_H, z_L))
  z_H, z_L = run_cycles(params, x_BxSxD, cos, sin, z_H, z_L)
  logits_BxSxV, q_Bx2 = apply(params, TRMNetwork.heads, z_H)
  return jax.lax.stop_gradient((z_H, z_L)), logits_BxSxV, q_Bx2
