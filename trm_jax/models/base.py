"""What every architecture shares: the config, the network's stages, the seam.

The original ships five models (``config/arch/*.yaml``) that differ only in
their recursion, their latents and their halting rule; the input embedding
(SPEC §2), the block (§1), the heads, the loss and the optimisers are common.
So one Flax module, ``Network``, holds every dense parameter of any of them:
the embeddings, the heads, one ``ReasoningModule`` per *level* (``L_level``,
``H_level``) and one fixed initial vector per latent (``H_init``,
``L1_init``, ...), all under the original's names. An architecture module
says which levels and latents it has and writes its supervision step with
``level_fn``/``embed``/``heads``; it then exports one ``Architecture``
record, the seam everything else (ACT, state, weights, golden, bench) goes
through.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from trm_jax import ops
from trm_jax.models import layers

POS_ENCODINGS = ("rope", "learned", "none")
FORWARD_DTYPES = ("float32", "bfloat16", "float64")
LOSS_TYPES = ("stablemax_cross_entropy", "softmax_cross_entropy")
# What the backward pass recomputes instead of storing (numbers unchanged):
# "none"; "attention": each attention op's internals (with kernels="xla", the
# [B, H, S, S] softmax); "network": everything inside each application of a
# level, of which only the inputs are kept.
REMAT_POLICIES = ("none", "attention", "network")


# Cycle loops up to this long are unrolled in the compiled program: XLA then
# schedules and fuses across cycles, and the graded cycle's backward reads
# each application's saved activations directly instead of stacking them in
# scan buffers (copies). Longer loops stay rolled, to bound compile time.
MAX_UNROLLED_CYCLES = 8


def cycle_scan(body: Callable[[Any, None], tuple[Any, None]], init: Any, length: int) -> Any:
  """``length`` applications of ``body`` as a ``jax.lax.scan`` (unrolled when short); the final carry."""
  out, _ = jax.lax.scan(body, init, None, length=length, unroll=True if length <= MAX_UNROLLED_CYCLES else 1)
  return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The fields every architecture reads, with the original's names (SPEC §10 defaults).

  Each architecture subclasses it (``arch`` names it) to add its own checks;
  build one from a mapping with ``trm_jax.models.config_from_dict``.
  """
  arch: ClassVar[str] = ""
  # False: P = ceil(puzzle_emb_ndim / hidden_size) whatever puzzle_emb_len says
  # (HRM and the baseline have no puzzle_emb_len).
  uses_puzzle_emb_len: ClassVar[bool] = True

  seq_len: int
  vocab_size: int
  num_puzzle_identifiers: int
  hidden_size: int = 512
  num_heads: int = 8
  expansion: float = 4.0
  L_layers: int = 2
  H_layers: int = 0
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
  # The Pallas ops' launch parameters (a mapping {op: {key: value}} is converted); how, not what, they compute.
  kernel_params: ops.KernelParams = ops.DEFAULT_PARAMS

  def fail(self, field: str, expected: str):
    raise ValueError(f"model config: {field}={getattr(self, field)!r}: expected {expected}")

  def __post_init__(self):
    for field in ("seq_len", "vocab_size", "num_puzzle_identifiers", "hidden_size", "num_heads",
                  "L_layers", "H_cycles", "L_cycles", "halt_max_steps"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        self.fail(field, "a positive integer")
    if not isinstance(self.H_layers, int) or self.H_layers < 0:
      self.fail("H_layers", "an integer >= 0")
    if self.num_heads > self.hidden_size:
      raise ValueError(f"model config: num_heads={self.num_heads} is larger than hidden_size={self.hidden_size} "
                       "(head dim hidden_size // num_heads would be 0)")
    if self.pos_encodings not in POS_ENCODINGS:
      self.fail("pos_encodings", f"one of {POS_ENCODINGS}")
    if self.pos_encodings == "rope" and self.head_dim % 2:
      raise ValueError(f"model config: pos_encodings='rope' needs an even head dim "
                       f"(hidden_size // num_heads = {self.head_dim})")
    if self.puzzle_emb_ndim < 0:
      self.fail("puzzle_emb_ndim", "an integer >= 0")
    if self.puzzle_emb_len < 0:
      self.fail("puzzle_emb_len", "an integer >= 0")
    if self.puzzle_emb_ndim > self.puzzle_emb_prefix_len * self.hidden_size:
      raise ValueError(
          f"model config: puzzle_emb_ndim={self.puzzle_emb_ndim} does not fit in "
          f"puzzle_emb_len * hidden_size = {self.puzzle_emb_len} * {self.hidden_size}")
    if self.forward_dtype not in FORWARD_DTYPES:
      self.fail("forward_dtype", f"one of {FORWARD_DTYPES}")
    if self.forward_dtype == "float64":
      # A reference mode (every activation, RMSNorm and RoPE in float64), for
      # comparing against float64 runs of the original; not turned on
      # implicitly, since x64 is process-wide and must be set before JAX starts.
      if not jax.config.jax_enable_x64:
        raise ValueError("model config: forward_dtype='float64' needs 64-bit JAX: set the environment "
                         "variable JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True) first)")
      if self.kernels != "xla":
        raise ValueError(f"model config: forward_dtype='float64' runs with kernels='xla' only (the "
                         f"Pallas kernels take float32, bfloat16 and float16), got kernels={self.kernels!r}")
    if self.loss_type not in LOSS_TYPES:
      self.fail("loss_type", f"one of {LOSS_TYPES}")
    if not 0.0 <= self.halt_exploration_prob <= 1.0:
      self.fail("halt_exploration_prob", "a probability in [0, 1]")
    if self.expansion <= 0:
      self.fail("expansion", "a positive number")
    ops.check_impl(self.kernels)
    if isinstance(self.kernel_params, Mapping):
      object.__setattr__(self, "kernel_params", ops.KernelParams.from_dict(self.kernel_params,
                                                                           "model config: kernel_params"))
    elif not isinstance(self.kernel_params, ops.KernelParams):
      self.fail("kernel_params", "a mapping {op: {key: value}} or an ops.KernelParams")
    if self.remat not in REMAT_POLICIES:
      self.fail("remat", f"one of {REMAT_POLICIES}")
    self.check_arch()

  def check_arch(self) -> None:
    """The architecture's own constraints (overridden by subclasses)."""

  @property
  def head_dim(self) -> int:
    """``hidden_size // num_heads``, as the original (attention's inner width is ``num_heads * head_dim``)."""
    return self.hidden_size // self.num_heads

  @property
  def puzzle_emb_prefix_len(self) -> int:
    """P: ``puzzle_emb_len`` if used and non-zero, else ceil(puzzle_emb_ndim / hidden_size)."""
    if self.uses_puzzle_emb_len and self.puzzle_emb_len:
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
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> "ModelConfig":
    """Builds a config from a mapping, ignoring keys that are not model fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in kwargs]
    if missing:
      raise ValueError(f"{source}: missing model field(s) {missing}")
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    """Every field plus ``arch``: what ``config_from_dict`` takes back."""
    return {"arch": self.arch, **dataclasses.asdict(self)}


# ---------------------------------------------------------------------------
# The network: every dense parameter of any architecture.


class Network(nn.Module):
  """Embeddings, heads, the levels and the fixed initial vectors.

  ``levels``: (name, number of blocks) per reasoning module, e.g.
  ``(("L_level", 2),)``; ``inits``: the names of the fixed initial vectors,
  e.g. ``("H_init", "L_init")``.
  """
  config: ModelConfig
  levels: tuple[tuple[str, int], ...]
  inits: tuple[str, ...]

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
    for name in self.inits:
      setattr(self, name, self.param(name, layers.trunc_normal(1.0), (d,)))
    for name, num_layers in self.levels:
      setattr(self, name, layers.ReasoningModule(
          num_layers=num_layers, hidden_size=d, num_heads=c.num_heads, expansion=c.expansion,
          mlp_t=c.mlp_t, num_positions=c.num_positions, rms_norm_eps=c.rms_norm_eps, kernels=c.kernels,
          remat_attention=c.remat == "attention", kernel_params=c.kernel_params))

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

  def level(self, name: str, h_BxSxD: jax.Array, inj_BxSxD: jax.Array | None,
            cos_SxK: jax.Array | None, sin_SxK: jax.Array | None) -> jax.Array:
    """One application of the level ``name``: ``f(h, inj)`` (``f(h)`` when ``inj`` is None)."""
    return getattr(self, name)(h_BxSxD, inj_BxSxD, cos_SxK, sin_SxK)

  def heads(self, z_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``logits [B, S, V]`` (prefix dropped) and ``q [B, 2]`` (float32) read from ``z``."""
    dtype = z_BxSxD.dtype
    p = self.config.puzzle_emb_prefix_len
    logits_BxSxV = jnp.dot(z_BxSxD[:, p:], self.lm_head.astype(dtype))
    q_Bx2 = jnp.dot(z_BxSxD[:, 0], self.q_head_kernel.astype(dtype)) + self.q_head_bias.astype(dtype)
    return logits_BxSxV, q_Bx2.astype(jnp.float32)

  def __call__(self, inputs_BxS, puzzle_rows_BxE):
    """Touches every parameter (used by ``init``): one application of each stage."""
    cos, sin = self.rope()
    x = self.embed(inputs_BxS, puzzle_rows_BxE)
    z = x
    for name, _ in self.levels:
      z = self.level(name, z, x, cos, sin)
    return self.heads(z)

  def rope(self) -> tuple[jax.Array | None, jax.Array | None]:
    c = self.config
    if c.pos_encodings != "rope":
      return None, None
    return layers.rope_tables(c.num_positions, c.head_dim, c.rope_theta,
                              jnp.promote_types(c.dtype, jnp.float32))


# ---------------------------------------------------------------------------
# Helpers for writing a supervision step.


def init_network_params(net: Network, config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Initial dense parameters (SPEC §2), float32."""
  inputs = jnp.zeros((1, config.seq_len), jnp.int32)
  rows = jnp.zeros((1, config.puzzle_emb_ndim), jnp.float32) if config.puzzle_emb_ndim else None
  return net.init(rng, inputs, rows)["params"]


def init_puzzle_emb(config: ModelConfig) -> jax.Array:
  """The puzzle embedding table ``[num_puzzle_identifiers, puzzle_emb_ndim]``, zero init."""
  return jnp.zeros((config.num_puzzle_identifiers, config.puzzle_emb_ndim), jnp.float32)


def prepare(net: Network, params: Mapping[str, Any], inputs_BxS: jax.Array, puzzle_rows_BxE: jax.Array | None
            ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """``(x [B, S+P, D], cos, sin)``: the input embedding and the RoPE tables (None without RoPE)."""
  cos, sin = net.apply({"params": params}, method=Network.rope)
  x_BxSxD = net.apply({"params": params}, inputs_BxS, puzzle_rows_BxE, method=Network.embed)
  return x_BxSxD, cos, sin


def level_fn(net: Network, name: str) -> Callable[..., jax.Array]:
  """``f(params, h, inj, cos, sin)`` for the level ``name``; under ``remat="network"``
  the backward pass keeps only each call's inputs."""
  def apply(p, h, inj, cos, sin):
    return net.apply({"params": p}, name, h, inj, cos, sin, method=Network.level)
  return jax.checkpoint(apply) if net.config.remat == "network" else apply


def heads(net: Network, params: Mapping[str, Any], z_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  return net.apply({"params": params}, z_BxSxD, method=Network.heads)


# ---------------------------------------------------------------------------
# The seam.


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What the rest of the project knows about a model.

  ``latents``: the carry's named states, in the original's field names,
  each with the fixed parameter it resets to (``(("z_H", "H_init"), ...)``).
  ``levels``: the level names of the parameters (and of the original's
  ``inner.<level>.layers.<i>`` weights) with the config field holding each
  one's block count.
  ``recursion(config, params, latents, inputs, puzzle_rows)`` is one
  supervision step: ``(new_latents, logits [B,S,V], q [B,2])``, the new
  latents under ``stop_gradient``.
  ``block_calls(config)``: blocks applied per step, ``(all, with gradient)``
  (the FLOP count of ``trm_jax.bench``).
  ``halt_on_q_continue(config)``: training halts on ``q_halt > q_continue``
  (else ``q_halt > 0``); ``q_continue_target(config)``: the call also runs
  the second forward for the Q-continue target and its loss (SPEC §4, §11).
  ``paper_settings``: the model fields its ``config/arch/<name>.yaml`` sets
  differently from TRM's (the task configs apply them with ``:<name>``).
  ``has_cycles``: its step reads ``H_cycles``/``L_cycles`` (what a depth
  curriculum, ``trm_jax.curriculum``, changes).
  """
  name: str
  config_class: type
  latents: tuple[tuple[str, str], ...]
  levels: tuple[tuple[str, str], ...]
  recursion: Callable[..., tuple[dict[str, jax.Array], jax.Array, jax.Array]]
  block_calls: Callable[[Any], tuple[int, int]]
  halt_on_q_continue: Callable[[Any], bool]
  q_continue_target: Callable[[Any], bool]
  paper_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  has_cycles: bool = True

  def network(self, config: ModelConfig) -> Network:
    return Network(config, tuple((name, getattr(config, field)) for name, field in self.levels),
                   tuple(init for _, init in self.latents))

  def init_params(self, config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Initial dense parameters (SPEC §2), float32."""
    return init_network_params(self.network(config), config, rng)

  @property
  def latent_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.latents)

  @property
  def init_names(self) -> tuple[str, ...]:
    return tuple(init for _, init in self.latents)


def trm_act_continue(config: ModelConfig) -> bool:
  """TRM's rule (and its ablations'): ``no_ACT_continue=False`` halts on q_continue and learns it."""
  return not config.no_ACT_continue


def always(config: ModelConfig) -> bool:
  del config
  return True


def never(config: ModelConfig) -> bool:
  del config
  return False
