"""The selective scan's tiling (`Config`, `default_config`), what the kernels are specialised on
(`_Static`) and the in-kernel helpers that the v4 and v6 kernels share (fast math, delta, loads).

Kernel families (see the package docstring): "v6" for a padded d_state <= 16, "v4" above.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
LOG2E = 1.4426950408889634
MAX_D_STATE = 64
KERNELS = ("v4", "v6")


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling of one call (`None` fields are chosen by `default_config`; block sizes are powers of two).

  Attributes:
    block_d: channels per program in the forward-direction kernels (forward, segment state pass).
    num_warps: warps per program in the forward-direction kernels.
    bwd_block_d: channels per program in the backward kernel.
    bwd_num_warps: warps per program in the backward kernel (and the segment adjoint pass).
    chunk: tokens per loop step and the checkpoint interval: the backward recomputes a chunk's states
      from the state saved at its start. v4 scans the chunk's tokens in parallel; v6 walks them one
      by one. Triton's compile time grows steeply with the unrolled body, so keep it small.
    segments: time segments run in parallel (two-pass scan); 1 = one program walks the whole length.
    num_stages: Triton software-pipelining depth.
    kernels: "v6" (token by token on [d_state, block_d] register tiles, one warp a program) or "v4"
      (time-parallel chunks). None: "v6" for a padded d_state <= 16, "v4" above (v6 holds a
      program's whole state tiles in registers). H100 2026-12-05: v6 fwd+bwd 1.4-1.7x faster than
      v4 at every d_state-16 benchmark shape (results/README.md).
    state_block: v4: states per [chunk, block_d, state_block] tile in the forward-direction kernels
      (a power of two dividing the padded d_state); the kernels loop statically over the groups.
    bwd_state_block: v4: the same for the backward (it holds about twice as many live tiles).
  """

  block_d: int | None = None
  num_warps: int | None = None
  bwd_block_d: int | None = None
  bwd_num_warps: int | None = None
  chunk: int | None = None
  segments: int | None = None
  num_stages: int = 1
  kernels: str | None = None
  state_block: int | None = None
  bwd_state_block: int | None = None


# The largest padded d_state for which the default is v6 (its state tiles live in registers).
V6_MAX_D_STATE = 16


# One wave of v6 backward programs: 255 registers a one-warp program leave room for 8 of them an SM,
# on the 132 SMs of an H100 or H200.
V6_BWD_WAVE = 8 * 132


def _v6_full_waves(programs: int) -> bool:
  """Whether `programs` v6 backward programs fill their last wave to at least 90%. H100 2026-12-05
  at (8, 2048, 5120, 16): 2 segments (2560 programs, 2.4 waves) 7.55 ms fwd+bwd, 4 segments (4.8
  waves) 6.90; the three other benchmark shapes already sit at 2.9, 2.9 and 1.9 waves."""
  waves = programs / V6_BWD_WAVE
  return waves >= 0.9 * math.ceil(waves)


def _pow2_ceil(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _padded_d_state(d_state: int) -> int:
  return max(2, _pow2_ceil(d_state))


def default_config(batch: int, length: int, d_inner: int, d_state: int, n_groups: int = 1,
                   config: Config | None = None) -> Config:
  """Fills the `None` fields of `config` from the call's shape and checks the given ones."""
  c = config or Config()
  n_p = _padded_d_state(d_state)
  d_group = d_inner // n_groups
  kernels = c.kernels or ("v6" if n_p <= V6_MAX_D_STATE else "v4")
  if kernels not in KERNELS:
    raise ValueError(f"Config.kernels must be one of {KERNELS} or None, got {c.kernels!r}")
  v6 = kernels == "v6"
  block_d = c.block_d or max(8, min(32, _pow2_ceil(d_group)))
  bwd_block_d = c.bwd_block_d or block_d
  # v6 backward: checkpoints every 8 tokens (offline SASS: 368 B of spill at 8, 1008 B at 16). v4:
  # Offline SASS (triton 3.6, sm_90) at (8, 2048, 1536, 16): [16, 32, 16] forward tiles with 8 warps
  # take 128 registers and no spills; the backward at 8 states a tile 255 registers, no spills.
  chunk = c.chunk or (8 if v6 else max(8, min(16, _pow2_ceil(length))))
  state_block = c.state_block or min(16, n_p)
  bwd_state_block = c.bwd_state_block or min(8, n_p)
  for name, v in (("state_block", state_block), ("bwd_state_block", bwd_state_block)):
    if v & (v - 1) or n_p % v:
      raise ValueError(f"Config.{name}={v} must be a power of two dividing the padded d_state {n_p}")
  for name, v in (("block_d", block_d), ("bwd_block_d", bwd_block_d), ("chunk", chunk)):
    if v & (v - 1):
      raise ValueError(f"Config.{name}={v} must be a power of two")
  segments = c.segments
  if segments is None:
    programs = batch * n_groups * -(-d_group // block_d)
    # v6: one-warp backward programs, each a chain of dependent tokens: aim at ~2048 of them (8
    # segments at (8, 2048, 1536, 16)) and at a last backward wave at least 90% full
    # (`_v6_full_waves`). v4 programs are 4 warps: 512.
    target = 2048 if v6 else 512

    def enough(s):
      return programs * s >= target and (not v6 or _v6_full_waves(programs * s))

    segments = 1
    while not enough(segments) and length // (segments * 2) >= 8 * chunk:
      segments *= 2
  # v4: 4 warps a program (H100 2026-11-23: fwd+bwd 10-14% faster than 8 at every benchmark shape).
  # v6: a warp per 32 channels (one warp at the default block_d).
  warps = c.num_warps or (max(1, block_d // 32) if v6 else 4)
  bwd_warps = c.bwd_num_warps or (max(1, bwd_block_d // 32) if v6 else c.num_warps or 4)
  return Config(block_d=block_d, num_warps=warps, bwd_block_d=bwd_block_d, bwd_num_warps=bwd_warps,
                chunk=chunk, segments=segments, num_stages=c.num_stages, kernels=kernels,
                state_block=state_block, bwd_state_block=bwd_state_block)


def supports(*, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             initial_state=None, return_final_state=False) -> str | None:
  """None when the Pallas kernel computes this (already validated) call; else the reason."""
  del delta, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state
  batch, length, d_inner = u.shape
  d_state = A.shape[1]
  if d_state > MAX_D_STATE:
    return (f"d_state={d_state} (A {tuple(A.shape)}) is above {MAX_D_STATE}: the state tile and the "
            f"backward's recomputed chunk would not fit in registers")
  if min(batch, length, d_inner, d_state) < 1:
    return f"empty call: u {tuple(u.shape)}, A {tuple(A.shape)}"
  return None


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels are specialised on (hashable: a custom_vjp nondiff argument)."""

  batch: int
  length: int        # true length L (tokens at and past it are padding)
  padded_length: int
  d_pad: int         # padded channels (n_groups * padded group width)
  d_group_pad: int
  n_pad: int         # padded d_state (a power of two)
  n_groups: int
  has_z: bool
  softplus: bool
  cfg: Config
  interpret: bool

  @property
  def seg_len(self) -> int:
    return self.padded_length // self.cfg.segments

  @property
  def masked(self) -> bool:
    return self.padded_length != self.length


# --------------------------------------------------------------------------------------------------
# Fast math. On the GPU these are single PTX instructions where libdevice would spend tens; in
# interpret mode (CPU tests) the exact jnp functions.


def _approx(op: str, x: jax.Array) -> jax.Array:
  """PTX `{op}.approx.ftz.f32` (ex2, lg2, rcp) elementwise: one special-function-unit instruction."""
  return plt.elementwise_inline_asm(f"{op}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f",
                                    pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


def _ex2(x: jax.Array, interpret: bool) -> jax.Array:
  """2**x; the GPU uses the special-function unit directly (relative error ~2**-22)."""
  return jnp.exp2(x) if interpret else _approx("ex2", x)


def _sigmoid(x, interpret):
  return 1.0 / (1.0 + _ex2(-x * LOG2E, interpret))


def _log1p(e: jax.Array, interpret: bool) -> jax.Array:
  """log(1 + e) for e in [0, 1]. On the GPU from the special-function unit's log2, corrected for the
  rounding of 1 + e (Goldberg 1991, "What every computer scientist should know about floating-point
  arithmetic", theorem 4): log1p(e) = log(w) e / (w - 1) with w = fl(1 + e), and e itself where w
  rounds to 1. Relative error a few ulp; ~8 instructions instead of libdevice's ~25."""
  if interpret:
    return jnp.log1p(e)
  return _log1p_from(e, functools.partial(_approx, "lg2"), functools.partial(_approx, "rcp"))


def _log1p_from(e, log2, recip):
  """`_log1p` given log2 and 1/x (tests check the formula with exact ones on the CPU)."""
  w = 1.0 + e
  return jnp.where(w == 1.0, e, log2(w) * (1.0 / LOG2E) * e * recip(w - 1.0))


def _softplus(x, interpret):
  # Same form as jax.nn.softplus (logaddexp(x, 0)): exact for large |x| in both directions.
  return jnp.maximum(x, 0.0) + _log1p(_ex2(-jnp.abs(x) * LOG2E, interpret), interpret)


def _fma(a, b, c, interpret):
  """a * b + c as one fma.rn.f32 on the GPU (Triton does not contract a product and a sum itself)."""
  if interpret:
    return a * b + c
  shape = jnp.broadcast_shapes(a.shape, b.shape, c.shape)
  args = [jnp.broadcast_to(x, shape) for x in (a, b, c)]
  return plt.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=f,f,f,f",
                                    pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, F32)])[0]


# --------------------------------------------------------------------------------------------------
# Inputs inside a kernel. Grid (channel block j, segment p, batch b); refs are that program's blocks.
#
# Nothing tells the compiler that inputs and outputs do not alias, so no load moves above an earlier
# store: a loop step therefore first loads everything its tokens need, then computes and stores. One
# memory latency is then paid per step instead of per token.


def _delta_of(dl_raw, bias, t, t_base, st: _Static):
  """(delta + bias, discretisation step) from local token t's loaded delta row; the step is zero on
  padded tokens."""
  x = dl_raw.astype(F32) + bias
  dt = _softplus(x, st.interpret) if st.softplus else x
  if st.masked:
    dt = dt * (t_base + t < st.length).astype(F32)
  return x, dt


def _load_rows(r, t, names, q: int | None = None):
  """Local token t's rows of the named refs, as loaded (the v6 kernels issue loads apart from use).
  With `q`, the B/C rows ("b", "c") come as tuples of q-element pieces (see `v6._fwd6_kernel`)."""
  def row(k):
    if q is None or k not in ("b", "c"):
      return r[k][t, :]
    n = r[k].shape[-1]
    return (r[k][t, :],) if q == n else tuple(r[k][t, pl.ds(m * q, q)] for m in range(n // q))
  return {k: row(k) for k in names if r[k] is not None}


def _widen(rows, bias, t, t_base, st: _Static):
  """`_load_rows`' rows in float32, with the delta row ("dl") replaced by the step "dt"."""
  def each(f, x):                                           # x: a row, or a tuple of pieces
    return tuple(f(p) for p in x) if isinstance(x, tuple) else f(x)

  out = {}
  for k, x in rows.items():
    if k == "dl":
      out["dt"] = _delta_of(x, bias, t, t_base, st)[1]
    else:
      out[k] = each(lambda p: p.astype(F32), x)
  return out


def _refs(refs, st: _Static, names: str):
  """Unpacks a kernel's refs by name; 'z' and 'dz' are None without a z gate."""
  it = iter(refs)
  out = {}
  for name in names.split():
    if (name == "z" or name == "dz") and not st.has_z:
      out[name] = None
    else:
      out[name] = next(it)
  rest = list(it)
  return out, rest
