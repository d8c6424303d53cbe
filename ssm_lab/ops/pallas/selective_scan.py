"""Pallas (Triton) GPU kernels for the Mamba-1 selective scan: `selective_scan(..., impl="pallas")`.

Two kernel families, chosen by the static `Config.variant`: "v4" (the default) is parallel over time
inside a chunk; "v3" walks time token by token (kept so one benchmark run can time both). Everything
below up to "v4" describes v3; the algebra (adjoint, gradients, segments, padding) is shared. Within
v4, `Config.fwd` / `Config.bwd` = "v5" pick rewritten forward-direction / backward-direction kernels
(same algebra and outputs, far fewer shuffles and barriers: comment block "v5 kernels" below;
3-4x slower than v4 on the GPU, kept for comparison). `Config.fwd` / `Config.bwd` = "v6" pick
kernels that walk tokens one by one on [d_state, block_d] register tiles, one warp a program
(comment block "v6 kernels" below). v6 is the default for d_state <= 16 (H100, 2026-12-05:
fwd+bwd 1.4-1.7x faster than v4 at every benchmark shape; benchmarks/results/selective_scan_h100.md),
v4 above. `Config.fwd` = "v7" picks forward-direction kernels on per-state channel vectors
(fewer instructions, no shuffles or barriers, but slower than v6 on the H100; kept for comparison).

v4 ("v4 kernels" below): a program owns `block_d` channels of one batch row and one time segment and
walks it `chunk` (T) tokens at a time. Per chunk it loads [T, block_d] tiles (channels contiguous) and,
per group of `state_block` states, forms the [T, block_d, state_block] decays a = exp(delta A) and
inputs b = delta u B, runs h_t = a_t h_{t-1} + b_t over the T axis as one scan of the pairs (a, b)
(`scan_primitive.linear_recurrence`, Triton's tt.scan), folds the carried state in
(h_t += P_t h_carry, P_t = a_1...a_t) and contracts with C. The backward recomputes the chunk's states
the same way from the saved chunk-start state and runs the adjoint as a reverse scan of the pairs
(a_{t+1}, dy_t C_t). Triton lays [T, block_d, state_block] out with T inside each thread, so the scans
are sequential in registers and the parallelism is over channels and states.

The hardware-aware scan of Gu & Dao 2023 (section 3.3, appendix D): the [d_state] state of every channel
lives in registers while the kernel walks time, so [batch, length, d_inner, d_state] is never written
to HBM. One program (one warp) owns `block_d` channels of one batch row and one time segment; its
state tile is [block_d, d_state] float32 with one channel per lane (see "Layout" below), so per-token
channel vectors load coalesced and the C contraction over d_state stays inside a thread. Per token it
fuses softplus(delta + delta_bias), the discretisation exp(delta * A) and delta * B * u, the C
contraction, the D skip and the z gate. Each loop step loads all inputs of its tokens before it stores
anything (the compiler cannot move a load above a store that might alias it).

Backward (`jax.custom_vjp`): the forward saves the state at the start of every `chunk` tokens
([batch, length / chunk, d_state, d_inner] float32). The backward walks chunks in reverse; for each it
recomputes the chunk's states in registers from the saved one, then runs the adjoint recurrence

  g_t = dL/dh_t = exp(delta_{t+1} A) g_{t+1} + dy_t C_t   (dy: the gradient before the C contraction)

token by token backwards, with w_t = h_t - delta_t u_t B_t (= exp(delta_t A) h_{t-1}):
  d delta_t = sum_n g_t (A w_t + u_t B_t),  du_t = D dy_t + delta_t sum_n g_t B_t,
  dA += g_t w_t delta_t,  dB_t = sum_d g_t delta_t u_t,  dC_t = sum_d dy_t h_t.
dA, dD and d(delta_bias) are accumulated per program and summed over batch (and segments) in XLA;
dB and dC are written per channel block and summed over the blocks of each group in XLA.

Time segments (`segments` > 1, for calls with few channels and long sequences): a first pass runs every
segment from a zero state (forward: the segment's end state and sum of delta; backward: the adjoint at
the segment's start). Because A does not depend on time, a segment's total decay is exp(A * sum delta),
so the true state entering each segment follows from a short recurrence over segments (`_hand_over`:
unrolled into one XLA fusion, not a while loop), and the main kernels then run all segments in
parallel.

Padding: d_state is padded to a power of two (A = 0, B = C = 0 keep padded states at zero); channels
are padded per group to a multiple of block_d (padded channels are independent and sliced away);
time is padded at the end to a multiple of unroll * segments, and the kernels zero delta on padded
tokens so the state (and so the final state) passes through them unchanged.

Measurements, floors and the versions tried: benchmarks/NOTES_selective_scan.md.

Without a GPU the kernels run in Pallas interpret mode (how CI checks them against the reference).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ssm_lab.ops import registry as reg
from ssm_lab.ops.selective_scan import REGISTRY
from ssm_lab.ops.pallas import interpret_mode
from ssm_lab.ops.pallas.scan_primitive import linear_recurrence

F32 = jnp.float32
LOG2E = 1.4426950408889634
MAX_D_STATE = 64


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling of one call (`None` fields are chosen by `default_config`; block sizes are powers of two).

  Attributes:
    block_d: channels per program in the forward kernels.
    num_warps: warps per program in the forward kernels.
    bwd_block_d: channels per program in the backward kernel.
    bwd_num_warps: warps per program in the backward kernel.
    chunk: the checkpoint interval; the backward recomputes (and holds in registers) `chunk` state
      tiles at a time. Triton's compile time grows steeply with the unrolled body, so keep it small.
    unroll: tokens unrolled per loop step in the forward-direction kernels (a multiple of chunk).
    segments: time segments run in parallel (two-pass scan); 1 = one program walks the whole length.
    num_stages: Triton software-pipelining depth.
    variant: "v4" (time-parallel chunks, the default) or "v3" (token by token; kept for comparison).
    state_block: v4 only: states per [chunk, block_d, state_block] tile in the forward-direction
      kernels (a power of two dividing the padded d_state); the kernels loop statically over the
      d_state / state_block groups.
    bwd_state_block: the same for the backward-direction kernels (they hold about twice as many
      live tiles per state).
    bwd: v4 only: the backward kernel. "v4", "v5" (one register layout for every tile, state
      groups summed before the cross-lane sums, the pre-gate output saved by the forward; see "v5
      kernels" below) or "v6" (token by token on [d_state, block_d] register tiles, one warp a
      program; see "v6 kernels" below).
    fwd: v4 only: the forward-direction kernels (forward and segment state pass). "v4", "v5" (the
      v5 tiles and explicit recurrences; see "v5 kernels" below), "v6" (the v6 tiles, token by
      token; see "v6 kernels" below) or "v7" (the state as d_state channel vectors, one channel a
      lane; see "v7" below; H100 2026-12-05: 1.2-1.5x slower than v6 in the forward at the
      batch-8 shapes, kept for comparison).
      When fwd and bwd are both None: "v6" for a padded d_state <= 16 (measured on the H100), "v4"
      above (v6 holds a program's whole [d_state, block_d] state tiles in registers). When only
      one is given, the other is "v4".

    prefetch: v6 forward-direction kernels and adjoint pass: load the next chunk's inputs before the
      current chunk's work (carried through the loop), so that no chunk waits for its loads. Costs
      registers (offline SASS at (8, 2048, 5120, 16): forward 164 -> 252, state pass 128 -> 166,
      so fewer resident warps). Off: slower on the H100 (2026-12-05, fwd+bwd pipelined 5.49 against
      5.37 ms at (8, 2048, 5120, 16), 1.82 against 1.77 at (8, 2048, 1536, 16)).
    bwd_prefetch: v6 backward: load the next sub-chunk's C, dy and z before the current one's work
      (offline SASS at (8, 2048, 5120, 16): 96 B of stack against 16). Off: slower on the H100
      (5.56 against 5.37 ms, 1.83 against 1.77, same call).
    pack_bc: v6 kernels (forward and backward both "v6"), bf16 B and C: read them from one uint32
      array (B in the low half of each word, C in the high half, as v3 does), so one load and one
      register a state carry both. Ignored for other dtypes. Offline SASS at (8, 2048, 5120, 16):
      forward 164 -> 128 registers (16 one-warp programs an SM instead of 12). Checked on the GPU,
      not yet timed: off by default.
    split_states: v6 forward, state pass and backward: hold the state (and the backward's adjoint)
      as d_state/4 tiles of 4 states, so sums over states are fma chains across them (see
      `_fwd6_kernel`). Not yet timed: off by default.

  In v4, `chunk` is the number of tokens scanned in parallel (and the checkpoint interval) and
  `unroll` equals it.
  """

  block_d: int | None = None
  num_warps: int | None = None
  bwd_block_d: int | None = None
  bwd_num_warps: int | None = None
  chunk: int | None = None
  unroll: int | None = None
  segments: int | None = None
  num_stages: int = 1
  variant: str = "v4"
  state_block: int | None = None
  bwd_state_block: int | None = None
  bwd: str | None = None
  fwd: str | None = None
  prefetch: bool = False
  bwd_prefetch: bool = False
  pack_bc: bool = False
  split_states: bool = False


# The largest padded d_state for which the default is v6 (its state tiles live in registers).
V6_MAX_D_STATE = 16


# One wave of v6 backward programs: 255 registers a one-warp program leave room for 8 of them an SM,
# on the 132 SMs of an H100 or H200.
V6_BWD_WAVE = 8 * 132


def _v6_full_waves(programs: int) -> bool:
  """Whether `programs` v6 backward programs fill their last wave to at least 90%. H100 2026-12-05
  (results/selective_scan_h100.md) at (8, 2048, 5120, 16): 2 segments (2560 programs, 2.4 waves)
  7.55 ms fwd+bwd, 4 segments (4.8 waves) 6.90; the three other shapes already sit at 2.9, 2.9 and
  1.9 waves."""
  waves = programs / V6_BWD_WAVE
  return waves >= 0.9 * math.ceil(waves)


def _pow2_ceil(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _padded_d_state(d_state: int) -> int:
  return max(2, _pow2_ceil(d_state))


def default_config(batch: int, length: int, d_inner: int, d_state: int, n_groups: int = 1,
                   config: Config | None = None) -> Config:
  """Fills the `None` fields of `config` from the call's shape (see benchmarks/NOTES_selective_scan.md)."""
  c = config or Config()
  n_p = _padded_d_state(d_state)
  d_group = d_inner // n_groups
  if c.variant == "v4":
    return _default_config_v4(batch, length, d_group, n_groups, n_p, c)
  if c.variant != "v3":
    raise ValueError(f"Config.variant must be 'v3' or 'v4', got {c.variant!r}")
  if c.bwd not in (None, "v4") or c.fwd not in (None, "v4"):
    raise ValueError(f"Config.bwd={c.bwd!r} / Config.fwd={c.fwd!r} need variant 'v4' (got variant "
                     f"'v3')")
  # One warp per program, one channel per lane while d_state <= 16; past that, lanes split the
  # states of a channel so that a lane keeps at most 16 of them.
  block_d = c.block_d or max(4, min(32, _pow2_ceil(d_group), 512 // n_p))
  bwd_block_d = c.bwd_block_d or block_d
  # The backward holds `chunk` recomputed state tiles in registers.
  chunk = c.chunk or (4 if n_p <= 16 else 2)
  unroll = c.unroll or max(chunk, 8 if n_p <= 16 else 4)
  if unroll % chunk:
    raise ValueError(f"Config.unroll={unroll} must be a multiple of Config.chunk={chunk}")
  segments = c.segments
  if segments is None:
    # A program is one warp walking its segment token by token, latency-bound: split time until
    # there are ~2048 programs (~16 warps per SM on 132 SMs), keeping segments of >= 256 tokens (the
    # segment passes cost about one more forward). H200 sweep: notes file.
    programs = batch * -(-d_inner // block_d)
    segments = 1
    while programs * segments < 2048 and length // (segments * 2) >= 256:
      segments *= 2
  return Config(block_d=block_d, num_warps=c.num_warps or 1, bwd_block_d=bwd_block_d,
                bwd_num_warps=c.bwd_num_warps or 1, chunk=chunk, unroll=unroll, segments=segments,
                num_stages=c.num_stages, variant="v3", state_block=1, bwd_state_block=1,
                bwd="v4", fwd="v4")


def _default_config_v4(batch: int, length: int, d_group: int, n_groups: int, n_p: int,
                       c: Config) -> Config:
  """v4: a program scans `chunk` tokens x `block_d` channels at once; time segments only when the
  (batch, channel block) grid alone would leave the GPU idle (before any device measurement: the
  sweep in benchmarks/selective_scan.py is there to set these)."""
  # Offline SASS (triton 3.6, sm_90) at (8, 2048, 1536, 16): [16, 32, 16] forward tiles with 8 warps
  # take 128 registers and no spills; the backward at 8 states per tile 255 registers, no spills.
  # One state per tile (2-D [chunk, block_d] tiles) spills and converts layouts through shared
  # memory for every state (notes file).
  if c.fwd is None and c.bwd is None:
    # v6 where it was measured (d_state 16, H100 2026-12-05: fwd+bwd 2.34 / 3.18 / 15.8 / 7.55 ms at
    # the four benchmark shapes against v4's 3.99 / 4.34 / 22.6 / 11.0; notes file).
    kind = "v6" if n_p <= V6_MAX_D_STATE else "v4"
    c = dataclasses.replace(c, fwd=kind, bwd=kind)
  else:
    c = dataclasses.replace(c, fwd=c.fwd or "v4", bwd=c.bwd or "v4")
  block_d = c.block_d or max(8, min(32, _pow2_ceil(d_group)))
  bwd_block_d = c.bwd_block_d or block_d
  # v5: chunks of 8 (offline SASS: the v5 backward spills 760 B at 16, none at 8; notes file).
  v5 = "v5" in (c.fwd, c.bwd)
  v6 = "v6" in (c.fwd, c.bwd) or c.fwd == "v7"
  # v6 backward: checkpoints every 8 tokens (offline SASS of the prototype: 368 B of spill at 8,
  # 1008 B at 16).
  chunk = c.chunk or (8 if v5 or v6 else max(8, min(16, _pow2_ceil(length))))
  if c.unroll not in (None, chunk):
    raise ValueError(f"Config.unroll={c.unroll} must equal Config.chunk={chunk} for variant 'v4'")
  state_block = c.state_block or min(4 if c.fwd == "v5" else 16, n_p)
  # v5 backward: 4 states a tile (offline SASS at (8, 2048, 1536, 16), chunk 8: 248 registers, no
  # spill; 8 states spill; notes file).
  bwd_state_block = c.bwd_state_block or min(4 if c.bwd == "v5" else 8, n_p)
  for name, v in (("state_block", state_block), ("bwd_state_block", bwd_state_block)):
    if v & (v - 1) or n_p % v:
      raise ValueError(f"Config.{name}={v} must be a power of two dividing the padded d_state {n_p}")
  for name, v in (("block_d", block_d), ("bwd_block_d", bwd_block_d), ("chunk", chunk)):
    if v & (v - 1):
      raise ValueError(f"Config.{name}={v} must be a power of two for variant 'v4'")
  segments = c.segments
  if c.fwd not in ("v4", "v5", "v6", "v7"):
    raise ValueError(f"Config.fwd must be 'v4', 'v5', 'v6' or 'v7', got {c.fwd!r}")
  if c.bwd not in ("v4", "v5", "v6"):
    raise ValueError(f"Config.bwd must be 'v4', 'v5' or 'v6', got {c.bwd!r}")
  if c.prefetch and "v6" not in (c.fwd, c.bwd):
    raise ValueError(f"Config.prefetch=True needs the v6 forward or backward (fwd={c.fwd!r}, "
                     f"bwd={c.bwd!r})")
  if c.bwd_prefetch and c.bwd != "v6":
    raise ValueError(f"Config.bwd_prefetch=True needs Config.bwd='v6', got {c.bwd!r}")
  if c.split_states and "v6" not in (c.fwd, c.bwd):
    raise ValueError(f"Config.split_states=True needs the v6 forward or backward (fwd={c.fwd!r}, "
                     f"bwd={c.bwd!r})")
  if c.pack_bc and (c.fwd, c.bwd) != ("v6", "v6"):
    raise ValueError(f"Config.pack_bc=True needs Config.fwd='v6' and bwd='v6', got fwd={c.fwd!r}, "
                     f"bwd={c.bwd!r}")
  if segments is None:
    programs = batch * n_groups * -(-d_group // block_d)
    # v6: one-warp backward programs, each a chain of dependent tokens: like v3, aim at ~2048 of
    # them (benchmarks/results/scan_prototype_h200.md: 8 pieces at (8, 2048, 1536, 16)), and at a
    # last wave of the backward at least 90% full (`_v6_full_waves`).
    target = 2048 if v6 else 512

    def enough(s):
      return programs * s >= target and (not v6 or _v6_full_waves(programs * s))

    segments = 1
    while not enough(segments) and length // (segments * 2) >= 8 * chunk:
      segments *= 2
  # 4 warps a program (forward and backward): the H100 sweeps of 2026-11-23 (commits 91f8ac3 and
  # 65229ff) measured fwd+bwd 4.00 / 4.23 / 22.48 / 10.89 ms at the four benchmark shapes against
  # 4.49 / 4.94 / 24.86 / 12.71 with 8 warps (10-14% faster everywhere; notes file).
  # v6: a warp per 32 channels (one warp at the default block_d).
  warps = c.num_warps or (max(1, block_d // 32) if c.fwd in ("v6", "v7") else 4)
  bwd_warps = c.bwd_num_warps or (max(1, bwd_block_d // 32) if c.bwd == "v6" else c.num_warps or 4)
  return Config(block_d=block_d, num_warps=warps, bwd_block_d=bwd_block_d,
                bwd_num_warps=bwd_warps, chunk=chunk, unroll=chunk,
                segments=segments, num_stages=c.num_stages, variant="v4", state_block=state_block,
                bwd_state_block=bwd_state_block, bwd=c.bwd, fwd=c.fwd, prefetch=c.prefetch,
                bwd_prefetch=c.bwd_prefetch, pack_bc=c.pack_bc,
                split_states=c.split_states)


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


# --------------------------------------------------------------------------------------------------
# In-kernel helpers.
#
# Layout. A program's state is a [block_d, d_state] tile, one channel per lane with all of its states
# in that lane's registers, so the per-token channel vectors (u, delta, z, y: [block_d], one element
# per lane) are exactly the tile's column layout and sums over d_state are in-thread adds. Triton
# derives layouts from memory accesses, and for a tile access that it can prove contiguous it picks
# 16-byte vectors spread over several lanes per channel, which costs a shared-memory layout conversion
# of every per-token vector. Tiles are therefore loaded and stored through index arrays scaled by
# `_one()` (1 at run time, opaque to Triton's analysis): the lanes still touch consecutive addresses,
# so the accesses coalesce, and B_t, C_t load as [block_d, d_state] tiles broadcast over the lanes.


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


def _softplus_and_slope(x, interp):
  """(softplus(x), sigmoid(x)) from one exponential: with e = exp(-|x|), sigmoid(x) = 1 / (1 + e) for
  x >= 0 and e / (1 + e) below (both exact to rounding; cheaper than -expm1(-softplus(x)))."""
  e = _ex2(-jnp.abs(x) * LOG2E, interp)
  r = 1.0 / (1.0 + e)
  return jnp.maximum(x, 0.0) + _log1p(e, interp), jnp.where(x >= 0.0, r, e * r)


def _one():
  """The int32 1, computed from the program id so that Triton cannot fold it before choosing layouts."""
  return jnp.minimum(pl.program_id(0), 0) + 1


class _TileIndex:
  """Index arrays addressing a [block_d, d_state] register tile of a [d_state, channels] block.

  Channels are the tile's first axis: with no provable contiguity Triton orders a tensor's axes as
  given and spreads the lanes over the first one.
  """

  def __init__(self, n: int, bd: int):
    one = _one()
    self.states = jnp.broadcast_to((jax.lax.iota(jnp.int32, n) * one)[None, :], (bd, n))
    self.chans = jnp.broadcast_to((jax.lax.iota(jnp.int32, bd) * one)[:, None], (bd, n))

  def load(self, ref, *lead):
    return ref[(*lead, self.states, self.chans)]

  def store(self, ref, value, *lead):
    ref[(*lead, self.states, self.chans)] = value

  def per_state(self, ref, t):
    """Row t of a [tokens, d_state] block, broadcast over the tile's channels ([bd, n])."""
    return ref[t, self.states]


class _BC:
  """B_t and C_t as [block_d, d_state] tiles broadcast over the channels.

  Every lane holds its own copy of the token's B and C rows, which costs registers and load
  instructions; bf16 B and C therefore come packed in one uint32 array (B in the low half, C in the
  high half: a bf16 is the high half of the float32 it widens to), so one load and 16 registers carry
  both. `load` returns the raw tile(s); `b` and `c` widen them where they are used.
  """

  def __init__(self, ix: _TileIndex, b_ref, c_ref):
    self.ix, self.b_ref, self.c_ref = ix, b_ref, c_ref    # c_ref is None when packed

  def load(self, t, need_b=True, need_c=True):
    if self.c_ref is None:
      return (self.ix.per_state(self.b_ref, t),)
    return (self.ix.per_state(self.b_ref, t) if need_b else None,
            self.ix.per_state(self.c_ref, t) if need_c else None)

  def b(self, raw):
    return _unpack_b(raw[0]) if self.c_ref is None else raw[0].astype(F32)

  def c(self, raw):
    return _unpack_c(raw[0]) if self.c_ref is None else raw[1].astype(F32)


def _unpack_b(packed):
  """B (float32) from a `_pack_bc` word: its low half is the bf16, i.e. the float32's high half."""
  return jax.lax.bitcast_convert_type(packed << 16, F32)


def _unpack_c(packed):
  """C (float32) from a `_pack_bc` word (its high half)."""
  return jax.lax.bitcast_convert_type(packed & jnp.uint32(0xFFFF0000), F32)


def _pack_bc(bm, cm):
  """uint32 [b, L, G, n] holding bf16 B (low half) and C (high half), or None for other dtypes."""
  if bm.dtype != jnp.bfloat16 or cm.dtype != jnp.bfloat16:
    return None
  return jax.lax.bitcast_convert_type(jnp.stack([bm, cm], axis=-1), jnp.uint32)


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
  packed_bc: bool    # bf16 B and C packed into one uint32 array (see _BC)
  cfg: Config
  interpret: bool

  @property
  def seg_len(self) -> int:
    return self.padded_length // self.cfg.segments

  @property
  def masked(self) -> bool:
    return self.padded_length != self.length


def _delta(dl_ref, bias, t, t_base, st: _Static):
  """(delta + bias, discretisation step) for local token t; the step is zero on padded tokens."""
  return _delta_of(dl_ref[t, :], bias, t, t_base, st)


def _delta_of(dl_raw, bias, t, t_base, st: _Static):
  """`_delta` from token t's loaded delta row."""
  x = dl_raw.astype(F32) + bias
  dt = _softplus(x, st.interpret) if st.softplus else x
  if st.masked:
    dt = dt * (t_base + t < st.length).astype(F32)
  return x, dt


def _load_rows(r, t, names, q: int | None = None):
  """Local token t's rows of the named refs, as loaded (the v6 kernels issue loads apart from use).
  With packed B/C (`_Static.packed_bc`) "b" is the packed row and "c" is not loaded: B's row brings
  it. With `q`, the B/C rows ("b", "c") come as tuples of q-element pieces (see `_fwd6_kernel`)."""
  def row(k):
    if q is None or k not in ("b", "c"):
      return r[k][t, :]
    n = r[k].shape[-1]
    return (r[k][t, :],) if q == n else tuple(r[k][t, pl.ds(m * q, q)] for m in range(n // q))
  return {k: row(k) for k in names if r[k] is not None}


def _widen(rows, bias, t, t_base, st: _Static):
  """`_load_rows`' rows in float32, with the delta row ("dl") replaced by the step "dt". A packed
  B/C row ("b", or "cc" where only C is wanted) gives "b" and "c" (bf16 is the high half of the
  float32 it widens to)."""
  def each(f, x):                                           # x: a row, or a tuple of pieces
    return tuple(f(p) for p in x) if isinstance(x, tuple) else f(x)

  out = {}
  for k, x in rows.items():
    if k == "dl":
      out["dt"] = _delta_of(x, bias, t, t_base, st)[1]
    elif st.packed_bc and k in ("b", "cc"):
      if k == "b":
        out["b"] = each(_unpack_b, x)
      out["c"] = each(_unpack_c, x)
    else:
      out["c" if k == "cc" else k] = each(lambda p: p.astype(F32), x)
  return out


# --------------------------------------------------------------------------------------------------
# Kernels. Grid (channel block j, segment p, batch b); refs are that program's blocks.
#
# Nothing tells the compiler that inputs and outputs do not alias, so no load moves above an earlier
# store: a loop step therefore first loads everything its tokens need, then computes and stores. One
# memory latency is then paid per step instead of per token.


def _refs(refs, st: _Static, names: str):
  """Unpacks a kernel's refs by name; 'z' and 'c' are skipped when absent (no z, packed B/C)."""
  it = iter(refs)
  out = {}
  for name in names.split():
    if (name == "z" or name == "dz") and not st.has_z:
      out[name] = None
    elif name == "c" and st.packed_bc:
      out[name] = None
    else:
      out[name] = next(it)
  rest = list(it)
  return out, rest


def _fwd_kernel(*refs, st: _Static, save_ck: bool):
  """y and the segment's end state from the segment's start state; optionally the chunk checkpoints."""
  r, rest = _refs(refs, st, "u dl z b c a d bias h0 y hend")
  ck_ref = rest[0] if save_ck else None
  T, U, S = st.cfg.chunk, st.cfg.unroll, st.seg_len
  ix = _TileIndex(st.n_pad, r["d"].shape[0])
  bc = _BC(ix, r["b"], r["c"])
  t_base = pl.program_id(1) * S
  a2 = ix.load(r["a"]) * LOG2E                              # [bd, n]
  d_skip = r["d"][...]
  bias = r["bias"][...]

  def step(si, h):
    ts = [si * U + i for i in range(U)]
    ins = []
    for t in ts:                                            # all loads of the step first
      u = r["u"][t, :]
      _, dt = _delta(r["dl"], bias, t, t_base, st)
      z = r["z"][t, :] if st.has_z else None
      ins.append((u, dt, z, bc.load(t)))
    for i, (t, (u, dt, z, raw)) in enumerate(zip(ts, ins, strict=True)):
      if save_ck and i % T == 0:
        ix.store(ck_ref, h, si * (U // T) + i // T)
      u = u.astype(F32)
      h = _ex2(dt[:, None] * a2, st.interpret) * h + (dt * u)[:, None] * bc.b(raw)
      y = jnp.sum(h * bc.c(raw), axis=1) + d_skip * u
      if st.has_z:
        zt = z.astype(F32)
        y = y * zt * _sigmoid(zt, st.interpret)
      r["y"][t, :] = y.astype(r["y"].dtype)
    return h

  ix.store(r["hend"], jax.lax.fori_loop(0, S // U, step, ix.load(r["h0"])))


def _state_kernel(*refs, st: _Static):
  """First forward pass of a segment: its end state from a zero start, and its sum of delta."""
  r, _ = _refs(refs, st, "u dl b a bias hloc dts")
  T, S = st.cfg.unroll, st.seg_len
  ix = _TileIndex(st.n_pad, r["bias"].shape[0])
  bc = _BC(ix, r["b"], None if st.packed_bc else r["b"])   # "b": the packed B/C array, or B
  t_base = pl.program_id(1) * S
  a2 = ix.load(r["a"]) * LOG2E
  bias = r["bias"][...]

  def chunk(ci, carry):
    h, dts = carry
    for i in range(T):
      t = ci * T + i
      u = r["u"][t, :].astype(F32)
      _, dt = _delta(r["dl"], bias, t, t_base, st)
      h = _ex2(dt[:, None] * a2, st.interpret) * h + (dt * u)[:, None] * bc.b(bc.load(t, need_c=False))
      dts = dts + dt
    return h, dts

  h, dts = jax.lax.fori_loop(0, S // T, chunk, (jnp.zeros(a2.shape, F32),
                                                jnp.zeros(bias.shape, F32)))
  ix.store(r["hloc"], h)
  r["dts"][...] = dts


def _adjoint_kernel(*refs, st: _Static):
  """First backward pass of a segment: the adjoint of the state entering it, from outputs inside it."""
  r, _ = _refs(refs, st, "dl z cc a bias dy gloc dts")   # cc: the packed B/C array, or C
  T, S = st.cfg.unroll, st.seg_len
  ix = _TileIndex(st.n_pad, r["bias"].shape[0])
  bc = _BC(ix, r["cc"], None) if st.packed_bc else _BC(ix, None, r["cc"])
  t_base = pl.program_id(1) * S + S                         # this grid runs segments 1..P-1
  a2 = ix.load(r["a"]) * LOG2E
  bias = r["bias"][...]
  n_chunks = S // T

  def chunk(k, carry):
    g, dts = carry
    ci = n_chunks - 1 - k
    for i in reversed(range(T)):
      t = ci * T + i
      _, dt = _delta(r["dl"], bias, t, t_base, st)
      dys = r["dy"][t, :].astype(F32)
      if st.has_z:
        zt = r["z"][t, :].astype(F32)
        dys = dys * zt * _sigmoid(zt, st.interpret)
      g = g + dys[:, None] * bc.c(bc.load(t, need_b=False))
      g = _ex2(dt[:, None] * a2, st.interpret) * g
      dts = dts + dt
    return g, dts

  g, dts = jax.lax.fori_loop(0, n_chunks, chunk, (jnp.zeros(a2.shape, F32),
                                                  jnp.zeros(bias.shape, F32)))
  ix.store(r["gloc"], g)
  r["dts"][...] = dts


def _bwd_kernel(*refs, st: _Static):
  """Gradients of one segment's tokens, walking chunks backwards from the adjoint at its end."""
  r, _ = _refs(refs, st, "u dl z b c a d bias ck dy gend du ddl dz dbp dcp da dd dbias dh0")
  interp = st.interpret
  T, S = st.cfg.chunk, st.seg_len
  ix = _TileIndex(st.n_pad, r["d"].shape[0])
  bc = _BC(ix, r["b"], r["c"])
  n_chunks = S // T
  t_base = pl.program_id(1) * S
  a2 = ix.load(r["a"]) * LOG2E
  d_skip = r["d"][...]
  bias = r["bias"][...]

  def chunk(k, carry):
    g, d_a, d_d, d_bias = carry
    ci = n_chunks - 1 - k
    ts = [ci * T + i for i in range(T)]
    h = ix.load(r["ck"], ci)
    ins = []
    for t in ts:                                            # all loads of the chunk first
      _, dt = _delta(r["dl"], bias, t, t_base, st)
      ins.append((r["u"][t, :].astype(F32), dt, bc.load(t), r["dy"][t, :],
                  r["z"][t, :] if st.has_z else None))
    hs = []
    for u, dt, raw, _, _ in ins:                            # recompute the chunk's states
      h = _ex2(dt[:, None] * a2, interp) * h + (dt * u)[:, None] * bc.b(raw)
      hs.append(h)
    for t, h, (u, dt, raw, dout, z) in reversed(list(zip(ts, hs, ins, strict=True))):
      bt, ct = bc.b(raw), bc.c(raw)
      dout = dout.astype(F32)
      if st.has_z:
        zt = z.astype(F32)
        sg = _sigmoid(zt, interp)
        y = jnp.sum(h * ct, axis=1) + d_skip * u
        r["dz"][t, :] = (dout * y * sg * (1.0 + zt * (1.0 - sg))).astype(r["dz"].dtype)
        dys = dout * zt * sg
      else:
        dys = dout
      d_d = d_d + dys * u
      g = g + dys[:, None] * ct                             # the adjoint of h_t
      dtu = dt * u
      w = h - dtu[:, None] * bt                             # exp(dt A) h_{t-1}
      g_b = jnp.sum(g * bt, axis=1)
      ddt = jnp.sum(g * a2 * w, axis=1) * (1.0 / LOG2E) + u * g_b
      r["du"][t, :] = (dys * d_skip + dt * g_b).astype(r["du"].dtype)
      d_a = d_a + g * w * dt[:, None]
      r["dbp"][t, :] = jnp.sum(g * dtu[:, None], axis=0)
      r["dcp"][t, :] = jnp.sum(h * dys[:, None], axis=0)
      # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)): from dt, without reloading x.
      dx = ddt * -jnp.expm1(-dt) if st.softplus else ddt
      if st.masked:
        dx = dx * (t_base + t < st.length).astype(F32)
      d_bias = d_bias + dx
      r["ddl"][t, :] = dx.astype(r["ddl"].dtype)
      g = _ex2(dt[:, None] * a2, interp) * g
    return g, d_a, d_d, d_bias

  zeros_d = jnp.zeros(bias.shape, F32)
  g, d_a, d_d, d_bias = jax.lax.fori_loop(
      0, n_chunks, chunk, (ix.load(r["gend"]), jnp.zeros(a2.shape, F32), zeros_d, zeros_d))
  ix.store(r["da"], d_a)
  r["dd"][...] = d_d
  r["dbias"][...] = d_bias
  ix.store(r["dh0"], g)


# --------------------------------------------------------------------------------------------------
# v4 kernels: parallel over time inside a chunk. Grid (channel block j, segment p, batch b) as above;
# a program walks its segment `chunk` (T) tokens at a time. Per chunk it loads [T, block_d] tiles
# (channels contiguous) and, per group of `state_block` states, forms the [T, block_d, state_block]
# decays a and inputs b, runs the recurrence over the T axis as one parallel scan
# (scan_primitive.linear_recurrence) and folds the carried state in: h_t = hloc_t + P_t h_carry.
# The backward runs the adjoint g_t = a_{t+1} g_{t+1} + dy_t C_t as a reverse scan of the pairs
# (a_{t+1}, dy_t C_t) (the last token of the chunk takes decay 1: the carried adjoint already holds the
# next token's decay), then g_t = gloc_t + Q_t G_carry with Q_t = prod_{s>t} a_s inside the chunk.


class _StateIndex:
  """Index arrays addressing the [block_d, state_block] slice (states k0..k0+nb) of a [n, bd] block."""

  def __init__(self, bd: int, nb: int):
    self.states = jnp.broadcast_to(jax.lax.iota(jnp.int32, nb)[None, :], (bd, nb))
    self.chans = jnp.broadcast_to(jax.lax.iota(jnp.int32, bd)[:, None], (bd, nb))

  def load(self, ref, k0: int, *lead):
    return ref[(*lead, self.states + k0, self.chans)]

  def store(self, ref, k0: int, value, *lead):
    ref[(*lead, self.states + k0, self.chans)] = value


def _row(x: jax.Array, mask: jax.Array) -> jax.Array:
  """The row of x [T, ...] where the boolean [T] mask is set (a masked sum over the T axis)."""
  m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
  return jnp.sum(jnp.where(m, x, 0.0), axis=0)


def _dt_tile(x, t0, st: _Static):
  """Discretisation step of a [T, bd] tile of delta + bias whose first token is t0 (0 on padding)."""
  dt = _softplus(x, st.interpret) if st.softplus else x
  if st.masked:
    tok = t0 + jax.lax.iota(jnp.int32, x.shape[0])
    dt = dt * (tok < st.length).astype(F32)[:, None]
  return dt


def _fwd_refs(refs, st: _Static, mode: str):
  """The refs of a v4/v5 forward-direction kernel: (named refs, chunk-checkpoint ref or None,
  pre-gate output ref or None). Mode "state" has neither optional output."""
  if mode == "state":
    r, _ = _refs(refs, st, "u dl b a bias hloc dts")
    return r, None, None
  r, rest = _refs(refs, st, "u dl z b c a d bias h0 y hend")
  return r, (rest[0] if rest else None), (rest[1] if len(rest) > 1 else None)


def _fwd4_kernel(*refs, st: _Static, mode: str):
  """mode "fwd": y and the segment's end state (and the chunk checkpoints when a third output is
  given, and the pre-gate output y / (z sigmoid(z)) in float32 when a fourth is); mode "state": the
  end state from a zero start and the sum of delta (segment first pass)."""
  r, ck_ref, ypre_ref = _fwd_refs(refs, st, mode)
  T, S, nb = st.cfg.chunk, st.seg_len, st.cfg.state_block
  bd = r["bias"].shape[0]
  groups = st.n_pad // nb
  six = _StateIndex(bd, nb)
  t_base = pl.program_id(1) * S
  bias = r["bias"][...]
  a2 = [six.load(r["a"], k * nb) * LOG2E for k in range(groups)]          # [bd, nb]
  last = jax.lax.iota(jnp.int32, T) == T - 1
  if mode == "state":
    h0 = [jnp.zeros((bd, nb), F32) for _ in range(groups)]
  else:
    h0 = [six.load(r["h0"], k * nb) for k in range(groups)]
    d_skip = r["d"][...]

  def chunk(ci, carry):
    hs, dts = carry
    rows = pl.ds(ci * T, T)
    u = r["u"][rows, :].astype(F32)                                        # [T, bd]
    dt = _dt_tile(r["dl"][rows, :].astype(F32) + bias[None, :], t_base + ci * T, st)
    bk = [r["b"][rows, pl.ds(k * nb, nb)].astype(F32) for k in range(groups)]   # [T, nb]
    if mode == "fwd":
      ck = [r["c"][rows, pl.ds(k * nb, nb)].astype(F32) for k in range(groups)]
      z = r["z"][rows, :].astype(F32) if st.has_z else None
    if ck_ref is not None:
      for k in range(groups):
        six.store(ck_ref, k * nb, hs[k], ci)
    dtu = dt * u
    y = d_skip[None, :] * u if mode == "fwd" else None
    new = []
    for k in range(groups):
      a = _ex2(dt[:, :, None] * a2[k][None], st.interpret)                # [T, bd, nb]
      b = dtu[:, :, None] * bk[k][:, None, :]
      p, hl = linear_recurrence(a, b, axis=0)
      h = hl + p * hs[k][None]
      if mode == "fwd":
        y = y + jnp.sum(h * ck[k][:, None, :], axis=2)
      new.append(_row(h, last))
    if mode == "fwd":
      if ypre_ref is not None:
        ypre_ref[rows, :] = y
      if st.has_z:
        y = y * z * _sigmoid(z, st.interpret)
      r["y"][rows, :] = y.astype(r["y"].dtype)
    else:
      dts = dts + jnp.sum(dt, axis=0)
    return new, dts

  hs, dts = jax.lax.fori_loop(0, S // T, chunk, (h0, jnp.zeros((bd,), F32)))
  out = r["hloc"] if mode == "state" else r["hend"]
  for k in range(groups):
    six.store(out, k * nb, hs[k])
  if mode == "state":
    r["dts"][...] = dts


def _bwd4_kernel(*refs, st: _Static, mode: str):
  """mode "bwd": every gradient of one segment's tokens, chunks in reverse from the adjoint at its
  end; mode "adjoint": the adjoint of the state entering the segment from a zero adjoint at its end,
  and the sum of delta (segment first pass; this grid runs segments 1..P-1)."""
  if mode == "adjoint":
    r, _ = _refs(refs, st, "dl z c a bias dy gloc dts")
  else:
    r, _ = _refs(refs, st, "u dl z b c a d bias ck dy gend du ddl dz dbp dcp da dd dbias dh0")
  interp = st.interpret
  T, S, nb = st.cfg.chunk, st.seg_len, st.cfg.bwd_state_block
  bd = r["bias"].shape[0]
  groups = st.n_pad // nb
  six = _StateIndex(bd, nb)
  n_chunks = S // T
  t_base = (pl.program_id(1) + (1 if mode == "adjoint" else 0)) * S
  bias = r["bias"][...]
  a2 = [six.load(r["a"], k * nb) * LOG2E for k in range(groups)]          # [bd, nb]
  tok = jax.lax.iota(jnp.int32, T)
  first, last = tok == 0, tok == T - 1
  chans = jnp.broadcast_to(jax.lax.iota(jnp.int32, bd)[None, :], (T, bd))
  zeros_d = jnp.zeros((bd,), F32)
  zeros_s = [jnp.zeros((bd, nb), F32) for _ in range(groups)]
  if mode == "adjoint":
    g0 = zeros_s
  else:
    g0 = [six.load(r["gend"], k * nb) for k in range(groups)]
    d_skip = r["d"][...]

  def chunk(kk, carry):
    gs, d_as, d_d, d_bias = carry
    ci = n_chunks - 1 - kk
    t0 = ci * T
    rows = pl.ds(t0, T)
    # delta of the next token (token t0 + T - 1 gets 0: decay 1, see above); clipped inside the block.
    nxt = jnp.broadcast_to(jnp.minimum(t0 + 1 + tok, S - 1)[:, None], (T, bd))
    x = r["dl"][rows, :].astype(F32) + bias[None, :]
    x_next = r["dl"][nxt, chans].astype(F32) + bias[None, :]
    dout = r["dy"][rows, :].astype(F32)
    z = r["z"][rows, :].astype(F32) if st.has_z else None
    ck = [r["c"][rows, pl.ds(k * nb, nb)].astype(F32) for k in range(groups)]
    if mode == "bwd":
      u = r["u"][rows, :].astype(F32)
      bk = [r["b"][rows, pl.ds(k * nb, nb)].astype(F32) for k in range(groups)]
      hk = [six.load(r["ck"], k * nb, ci) for k in range(groups)]
    dt = _dt_tile(x, t_base + t0, st)
    dt_next = jnp.where(last[:, None], 0.0, _dt_tile(x_next, t_base + t0 + 1, st))
    dt_first = _row(dt, first)                                              # [bd]
    if st.has_z:
      sg = _sigmoid(z, interp)
      dys = dout * z * sg
    else:
      dys = dout
    if mode == "bwd":
      dtu = dt * u
      y = d_skip[None, :] * u
      g_b = jnp.zeros((T, bd), F32)                                         # sum_n g B
      g_aw = jnp.zeros((T, bd), F32)                                        # sum_n g A w
    new_g, new_da = [], []
    for k in range(groups):
      alpha = _ex2(dt_next[:, :, None] * a2[k][None], interp)              # [T, bd, nb]
      c = dys[:, :, None] * ck[k][:, None, :]
      q, gl = linear_recurrence(alpha, c, axis=0, reverse=True)
      g = gl + q * gs[k][None]                                              # dL/dh_t
      a_first = _ex2(dt_first[:, None] * a2[k], interp)                     # [bd, nb]
      new_g.append(a_first * _row(g, first))
      if mode == "adjoint":
        continue
      a = _ex2(dt[:, :, None] * a2[k][None], interp)
      b = dtu[:, :, None] * bk[k][:, None, :]
      p, hl = linear_recurrence(a, b, axis=0)
      h = hl + p * hk[k][None]
      w = h - b                                                             # exp(dt A) h_{t-1}
      y = y + jnp.sum(h * ck[k][:, None, :], axis=2)
      g_b = g_b + jnp.sum(g * bk[k][:, None, :], axis=2)
      g_aw = g_aw + jnp.sum(g * w * a2[k][None], axis=2)
      new_da.append(d_as[k] + jnp.sum(g * w * dt[:, :, None], axis=0))
      r["dbp"][rows, pl.ds(k * nb, nb)] = jnp.sum(g * dtu[:, :, None], axis=1)
      r["dcp"][rows, pl.ds(k * nb, nb)] = jnp.sum(h * dys[:, :, None], axis=1)
    if mode == "adjoint":
      return new_g, d_as, d_d, d_bias + jnp.sum(dt, axis=0)
    if st.has_z:
      r["dz"][rows, :] = (dout * y * sg * (1.0 + z * (1.0 - sg))).astype(r["dz"].dtype)
    r["du"][rows, :] = (dys * d_skip[None, :] + dt * g_b).astype(r["du"].dtype)
    ddt = g_aw * (1.0 / LOG2E) + u * g_b
    # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)): from dt, without another exp of x.
    dx = ddt * -jnp.expm1(-dt) if st.softplus else ddt
    if st.masked:
      dx = dx * ((t_base + t0 + tok) < st.length).astype(F32)[:, None]
    r["ddl"][rows, :] = dx.astype(r["ddl"].dtype)
    return new_g, new_da, d_d + jnp.sum(dys * u, axis=0), d_bias + jnp.sum(dx, axis=0)

  gs, d_as, d_d, d_bias = jax.lax.fori_loop(0, n_chunks, chunk, (g0, zeros_s, zeros_d, zeros_d))
  if mode == "adjoint":
    for k in range(groups):
      six.store(r["gloc"], k * nb, gs[k])
    r["dts"][...] = d_bias
    return
  for k in range(groups):
    six.store(r["da"], k * nb, d_as[k])
    six.store(r["dh0"], k * nb, gs[k])
  r["dd"][...] = d_d
  r["dbias"][...] = d_bias


# --------------------------------------------------------------------------------------------------
# v5 kernels (Config.bwd="v5" / Config.fwd="v5"): the v4 algebra, rearranged for what Triton makes
# of it.
#
# Offline SASS of the v4 backward (triton 3.6, sm_90, 4 warps, (8, 2048, 1536, 16)) per chunk: 8392
# instructions, 2050 SHFL, 80 BAR, 255 registers + 584 B spill; only ~1600 of the instructions are the
# arithmetic itself. The rest: (a) Triton's reverse tt.scan (the adjoint) costs ~640 SHFL a
# [16, 32, 8] tile even though the scanned axis lies inside each thread (a forward tt.scan costs
# none); (b) 33 layout conversions a chunk: each [T, block_d] and [T, state_block] load gets its own
# vectorised layout (the rows are provably contiguous), the reductions' results yet another, and
# most conversions cross warps (shared memory and a barrier each); (c) the sums over states, one
# shuffle tree per state group per quantity (y, sum g B, sum g A w). v5:
#   * tiles are [state_block, block_d, T] and every operand is loaded directly as such a tile (or
#     [state_block, block_d, 1]) through index arrays Triton cannot prove contiguous (`_one()`).
#     Triton's coalescing then orders the axes first to last (argSort of equal contiguities keeps
#     them in order), so every tile has one layout: lanes over states then channels, warps over
#     channels, the T tokens inside each thread. No conversions. Per-token values are replicated
#     over the lanes that hold states (each lane computes its own copy, as the slice layouts of v4
#     did) and [T, block_d] outputs are stored from every such lane (identical values, one address).
#   * no tt.scan: the recurrences are written out over the chunk's tokens (`_token_rows`): with
#     token positions from a plain iota the compiler knows which register holds which token, the
#     selects fold away and each step is one FMA a state element (the scan's pair product and the
#     carry fold disappear too). The adjoint reuses the forward decays a_t (one exponential per
#     element instead of two; no next-token delta).
#   * the products of all state groups are added elementwise before one sum over states per
#     quantity; with a z gate the pre-gate output y (needed by dz) comes from the forward (float32,
#     saved with the checkpoints; the v4 forward saves it too when the v5 backward follows).
#   * softplus'(x) = sigmoid(x) from softplus's own exponential (no expm1).
# dB and dC (sums over channels) are written per channel block as in v4.


class _Tile3:
  """Opaque index arrays for the v5 kernels' [state_block, block_d, T] tiles (see "v5 kernels").

  The axes are (states, channels, tokens): with no provable contiguity, Triton's coalescing orders a
  tile's axes first to last, so lanes go over states, then channels, warps over channels, and the
  T tokens of the scans stay inside each thread (the layout v4's tiles get).
  """

  def __init__(self, T: int, bd: int, nb: int):
    one = _one()

    def ax(size, axis, shape):
      shp = [1, 1, 1]
      shp[axis] = size
      return jnp.broadcast_to((jax.lax.iota(jnp.int32, size) * one).reshape(shp), shape)

    full, single = (nb, bd, T), (nb, bd, 1)
    self.state, self.chan, self.tok = ax(nb, 0, full), ax(bd, 1, full), ax(T, 2, full)
    self.state1, self.chan1 = ax(nb, 0, single), ax(bd, 1, single)
    st_, tk_ = jax.lax.iota(jnp.int32, nb) * one, jax.lax.iota(jnp.int32, T) * one
    self.out_state = jnp.broadcast_to(st_[:, None], (nb, T))
    self.out_tok = jnp.broadcast_to(tk_[None, :], (nb, T))

  def tokens(self, ref, t0, clip=None):
    """Rows t0.. of a [tokens, bd] block, replicated over states: [nb, bd, T]."""
    rows = self.tok + t0
    return ref[jnp.minimum(rows, clip) if clip is not None else rows, self.chan]

  def store_tokens(self, ref, t0, value):
    ref[self.tok + t0, self.chan] = value

  def states(self, ref, t0, k0):
    """Rows t0.., states k0.. of a [tokens, n] block, replicated over channels: [nb, bd, T]."""
    return ref[self.tok + t0, self.state + k0]

  def store_states(self, ref, t0, k0, value):
    """value [nb, T] into rows t0.., states k0.. of a [tokens, n] block."""
    ref[self.out_tok + t0, self.out_state + k0] = value

  def chans(self, ref):
    """A [bd] block replicated over states: [nb, bd, 1]."""
    return ref[self.chan1]

  def store_chans(self, ref, value):
    ref[self.chan1] = value

  def tile(self, ref, k0, *lead):
    """States k0.. of an [n, bd] block (after the `lead` indices): [nb, bd, 1]."""
    return ref[(*lead, self.state1 + k0, self.chan1)]

  def store_tile(self, ref, k0, value, *lead):
    ref[(*lead, self.state1 + k0, self.chan1)] = value


def _token_rows(T: int, bd: int, nb: int):
  """(tk, row, put) for [nb, bd, T] tiles: token positions, token i of a tile, a tile with token i
  replaced. tk is a plain iota (not opaque): the compiler knows each register's token, so the selects
  fold away and `row` / `put` are register moves (an explicit recurrence over them is one FMA per
  element, where Triton's reverse tt.scan costs 640 SHFL a [8, 32, 16] tile; notes file)."""
  tk = jnp.broadcast_to(jax.lax.iota(jnp.int32, T)[None, None, :], (nb, bd, T))

  def row(x, i):
    return jnp.sum(jnp.where(tk == i, x, -0.0), axis=2, keepdims=True)   # x + -0.0 == x: folds

  def put(tile, i, v):
    return jnp.where(tk == i, v, tile)

  return tk, row, put


def _fwd5_kernel(*refs, st: _Static, mode: str):
  """The v5 forward-direction kernels (see "v5 kernels"): as `_fwd4_kernel` (same modes and outputs),
  on [state_block, block_d, T] tiles with the recurrence written out over the chunk's tokens."""
  r, ck_ref, ypre_ref = _fwd_refs(refs, st, mode)
  interp = st.interpret
  T, S, nb = st.cfg.chunk, st.seg_len, st.cfg.state_block
  bd = r["bias"].shape[0]
  groups = st.n_pad // nb
  ix = _Tile3(T, bd, nb)
  tk, row, put = _token_rows(T, bd, nb)
  t_base = pl.program_id(1) * S
  bias = ix.chans(r["bias"])
  a2 = [ix.tile(r["a"], k * nb) * LOG2E for k in range(groups)]
  zeros = jnp.zeros((nb, bd, 1), F32)
  if mode == "state":
    h0 = [zeros] * groups
  else:
    h0 = [ix.tile(r["h0"], k * nb) for k in range(groups)]
    d_skip = ix.chans(r["d"])

  def chunk(ci, carry):
    hs, dts = carry
    t0 = ci * T
    x = ix.tokens(r["dl"], t0).astype(F32) + bias
    u = ix.tokens(r["u"], t0).astype(F32)
    bk = [ix.states(r["b"], t0, k * nb).astype(F32) for k in range(groups)]
    if mode == "fwd":
      ck = [ix.states(r["c"], t0, k * nb).astype(F32) for k in range(groups)]
      z = ix.tokens(r["z"], t0).astype(F32) if st.has_z else None
    if ck_ref is not None:
      for k in range(groups):
        ix.store_tile(ck_ref, k * nb, hs[k], ci)
    dt = _softplus(x, interp) if st.softplus else x
    if st.masked:
      dt = dt * ((t_base + t0 + tk) < st.length).astype(F32)
    dtu = dt * u
    y_acc, new = None, []
    for k in range(groups):
      a = _ex2(dt * a2[k], interp)
      b = dtu * bk[k]
      h, hs_k = hs[k], b
      for i in range(T):
        h = row(a, i) * h + row(b, i)
        if mode == "fwd":
          hs_k = put(hs_k, i, h)
      new.append(h)
      if mode == "fwd":
        yk = hs_k * ck[k]
        y_acc = yk if y_acc is None else y_acc + yk
    if mode == "state":
      return new, dts + jnp.sum(dt, axis=2, keepdims=True)
    y = jnp.sum(y_acc, axis=0, keepdims=True) + d_skip * u                # [nb, bd, T]
    if ypre_ref is not None:
      ix.store_tokens(ypre_ref, t0, y)
    if st.has_z:
      y = y * z * _sigmoid(z, interp)
    ix.store_tokens(r["y"], t0, y.astype(r["y"].dtype))
    return new, dts

  hs, dts = jax.lax.fori_loop(0, S // T, chunk, (h0, zeros))
  out = r["hloc"] if mode == "state" else r["hend"]
  for k in range(groups):
    ix.store_tile(out, k * nb, hs[k])
  if mode == "state":
    ix.store_chans(r["dts"], dts)


def _adjoint5_kernel(*refs, st: _Static):
  """The v5 segment adjoint pass (as `_bwd4_kernel` mode "adjoint", with explicit recurrences)."""
  r, _ = _refs(refs, st, "dl z c a bias dy gloc dts")
  interp = st.interpret
  T, S, nb = st.cfg.chunk, st.seg_len, st.cfg.bwd_state_block
  bd = r["bias"].shape[0]
  groups = st.n_pad // nb
  ix = _Tile3(T, bd, nb)
  tk, row, _ = _token_rows(T, bd, nb)
  t_base = (pl.program_id(1) + 1) * S                     # this grid runs segments 1..P-1
  bias = ix.chans(r["bias"])
  a2 = [ix.tile(r["a"], k * nb) * LOG2E for k in range(groups)]

  def chunk(kk, carry):
    gs, dts = carry
    t0 = (S // T - 1 - kk) * T
    x = ix.tokens(r["dl"], t0).astype(F32) + bias
    dys = ix.tokens(r["dy"], t0).astype(F32)
    z = ix.tokens(r["z"], t0).astype(F32) if st.has_z else None
    ck = [ix.states(r["c"], t0, k * nb).astype(F32) for k in range(groups)]
    dt = _softplus(x, interp) if st.softplus else x
    if st.masked:
      dt = dt * ((t_base + t0 + tk) < st.length).astype(F32)
    if st.has_z:
      dys = dys * z * _sigmoid(z, interp)
    new = []
    for k in range(groups):
      a = _ex2(dt * a2[k], interp)
      c = dys * ck[k]
      g = gs[k]
      for i in reversed(range(T)):
        g = row(a, i) * (g + row(c, i))
      new.append(g)
    return new, dts + jnp.sum(dt, axis=2, keepdims=True)

  zeros = jnp.zeros((nb, bd, 1), F32)
  gs, dts = jax.lax.fori_loop(0, S // T, chunk, ([zeros] * groups, zeros))
  for k in range(groups):
    ix.store_tile(r["gloc"], k * nb, gs[k])
  ix.store_chans(r["dts"], dts)


def _bwd5_kernel(*refs, st: _Static):
  """Every gradient of one segment's tokens (as `_bwd4_kernel` mode "bwd"; see "v5 kernels").

  Tiles are [state_block, block_d, T] (`_Tile3`); per-channel values and carries [.., .., 1]."""
  r, rest = _refs(refs, st, "u dl z b c a d bias ck dy gend")
  ypre_ref = rest.pop(0) if st.has_z else None
  r2, _ = _refs(rest, st, "du ddl dz dbp dcp da dd dbias dh0")
  r.update(r2)
  interp = st.interpret
  T, S, nb = st.cfg.chunk, st.seg_len, st.cfg.bwd_state_block
  bd = r["bias"].shape[0]
  groups = st.n_pad // nb
  ix = _Tile3(T, bd, nb)
  n_chunks = S // T
  t_base = pl.program_id(1) * S
  bias = ix.chans(r["bias"])                                              # [nb, bd, 1]
  d_skip = ix.chans(r["d"])
  a2 = [ix.tile(r["a"], k * nb) * LOG2E for k in range(groups)]          # [nb, bd, 1]
  tk, row, put = _token_rows(T, bd, nb)
  zeros = jnp.zeros((nb, bd, 1), F32)

  def chunk(kk, carry):
    gs, d_as, d_d, d_bias = carry
    ci = n_chunks - 1 - kk
    t0 = ci * T
    # All loads of the chunk first (see "Kernels" above).
    x = ix.tokens(r["dl"], t0).astype(F32) + bias
    dout = ix.tokens(r["dy"], t0).astype(F32)
    u = ix.tokens(r["u"], t0).astype(F32)
    z = ix.tokens(r["z"], t0).astype(F32) if st.has_z else None
    ypre = ix.tokens(ypre_ref, t0) if st.has_z else None
    bk = [ix.states(r["b"], t0, k * nb).astype(F32) for k in range(groups)]
    ck = [ix.states(r["c"], t0, k * nb).astype(F32) for k in range(groups)]
    hk = [ix.tile(r["ck"], k * nb, ci) for k in range(groups)]
    dt, slope = _softplus_and_slope(x, interp) if st.softplus else (x, None)
    if st.masked:
      dt = dt * ((t_base + t0 + tk) < st.length).astype(F32)
    if st.has_z:
      sg = _sigmoid(z, interp)
      dys = dout * z * sg
      # dz now (every load of the chunk is done): z, y and dy are then dead for the rest of it.
      ix.store_tokens(r["dz"], t0,
                      (dout * ypre * sg * (1.0 + z * (1.0 - sg))).astype(r["dz"].dtype))
    else:
      dys = dout
    dtu = dt * u
    gb_acc = gaw_acc = None                                               # summed over groups first
    new_g, new_da = [], []
    for k in range(groups):
      a = _ex2(dt * a2[k], interp)                                        # [nb, bd, T]
      b = dtu * bk[k]
      c = dys * ck[k]
      # The chunk's states h_t = a_t h_{t-1} + b_t from the checkpoint, then the adjoint backwards:
      # g_t = dL/dh_t = c_t + a_{t+1} g_{t+1} (gs[k] arrives already multiplied by a_{t0+T}).
      h, hs = hk[k], b
      for i in range(T):
        h = row(a, i) * h + row(b, i)
        hs = put(hs, i, h)
      g, gt = gs[k], c
      for i in reversed(range(T)):
        g = g + row(c, i)
        gt = put(gt, i, g)
        g = row(a, i) * g
      new_g.append(g)
      w = hs - b                                                          # exp(dt A) h_{t-1}
      gw = gt * w
      gb = gt * bk[k]
      gaw = gw * a2[k]
      gb_acc = gb if gb_acc is None else gb_acc + gb
      gaw_acc = gaw if gaw_acc is None else gaw_acc + gaw
      new_da.append(d_as[k] + jnp.sum(gw * dt, axis=2, keepdims=True))
      ix.store_states(r["dbp"], t0, k * nb, jnp.sum(gt * dtu, axis=1))
      ix.store_states(r["dcp"], t0, k * nb, jnp.sum(hs * dys, axis=1))
    g_b = jnp.sum(gb_acc, axis=0, keepdims=True)                          # [1, bd, T]
    g_aw = jnp.sum(gaw_acc, axis=0, keepdims=True)
    ix.store_tokens(r["du"], t0, (dys * d_skip + dt * g_b).astype(r["du"].dtype))
    ddt = g_aw * (1.0 / LOG2E) + u * g_b
    dx = ddt * slope if st.softplus else ddt
    if st.masked:
      dx = dx * ((t_base + t0 + tk) < st.length).astype(F32)
    ix.store_tokens(r["ddl"], t0, dx.astype(r["ddl"].dtype))
    return (new_g, new_da, d_d + jnp.sum(dys * u, axis=2, keepdims=True),
            d_bias + jnp.sum(dx, axis=2, keepdims=True))

  g0 = [ix.tile(r["gend"], k * nb) for k in range(groups)]
  gs, d_as, d_d, d_bias = jax.lax.fori_loop(0, n_chunks, chunk,
                                            (g0, [zeros] * groups, zeros, zeros))
  for k in range(groups):
    ix.store_tile(r["da"], k * nb, d_as[k])
    ix.store_tile(r["dh0"], k * nb, gs[k])
  ix.store_chans(r["dd"], d_d)
  ix.store_chans(r["dbias"], d_bias)


# --------------------------------------------------------------------------------------------------
# v6 kernels (Config.fwd / Config.bwd = "v6"; the default for d_state <= 16). `_fwd6_kernel`
# and `_adjoint6_kernel` take the places of the v4 forward-direction kernels and the segment adjoint
# pass; `_bwd6_kernel` is a drop-in for `_bwd4_kernel` mode "bwd" (same refs, also after the v4
# forward). All are written on the tiles of benchmarks/scan_prototype.py:
# the state, adjoint and dA are [d_state, block_d] float32 tiles read with plain slices (channels
# contiguous, last axis). At 32 channels a one-warp program jaxlib's Triton gives each lane 16-byte
# vectors: 4 channels x 4 states, 8 lanes over the channels and 4 over the states at d_state 16 (the
# prototype's 128-channel programs kept all states in the lane). A sum over states then takes two
# shuffle levels and one over channels three: 48 SHFL a token in the backward, fewer instructions
# than v3's [block_d, d_state] tiles addressed through index arrays (offline SASS: 56
# warp-instructions a token-channel in v3's backward, 21 in v6's; benchmarks/NOTES_selective_scan.md).
# Per chunk of T tokens (the forward's checkpoint interval) the kernel recomputes the state at every
# `_V6_SUB` tokens from the checkpoint; per sub-chunk it recomputes and keeps those states and their
# decays, then walks them backwards: g_t = a_{t+1} g_{t+1} + dy_t C_t (the carry holds a_{t+1} g_{t+1}),
# with the v3 algebra for every gradient and one exponential per state element and token.

# Sub-chunk: offline SASS at (8, 2048, 1536, 16), chunk 8: 32 B of stack at 2, 336 B at 4, with the
# same instruction count.
_V6_SUB = 2


def _fma(a, b, c, interpret):
  """a * b + c as one fma.rn.f32 on the GPU (Triton does not contract a product and a sum itself)."""
  if interpret:
    return a * b + c
  shape = jnp.broadcast_shapes(a.shape, b.shape, c.shape)
  args = [jnp.broadcast_to(x, shape) for x in (a, b, c)]
  return plt.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=f,f,f,f",
                                    pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, F32)])[0]


def recompute_sub_chunks(step, h, t0: int, T: int, U: int, before_sub=None):
  """The v6 backward's recompute of one chunk of T tokens from its checkpoint h (the state before
  token t0). `step(h, t) -> (decay a_t, h_t)`. Recomputes the state at every U tokens, then, sub-chunk
  by sub-chunk from the last, calls `before_sub(j)` (if given) and yields (j, states, decays): the
  U + 1 states from before the sub-chunk's first token t0 + j U to after its last, and the U decays.
  (Also used by benchmarks/scan_prototype.py.)"""
  subs = [h]
  for j in range(1, T // U):
    for i in range(U):
      _, h = step(h, t0 + (j - 1) * U + i)
    subs.append(h)
  for j in reversed(range(T // U)):
    if before_sub is not None:
      before_sub(j)
    hs, decays = [subs[j]], []
    for i in range(U):
      a, h = step(hs[-1], t0 + j * U + i)
      hs.append(h)
      decays.append(a)
    yield j, hs, decays


def _state_rows(st: _Static) -> int:
  """Rows (states) of one state tile in the v6 forward, state pass and backward: all of d_state, or
  4 with Config.split_states (see `_fwd6_kernel`)."""
  return min(4, st.n_pad) if st.cfg.split_states else st.n_pad


def _row_blocks(ref, q: int, nb: int, *lead):
  """ref[*lead] as nb tiles of q rows (the whole block when nb is 1)."""
  if nb == 1:
    return (ref[lead] if lead else ref[...],)
  return tuple(ref[(*lead, pl.ds(m * q, q), slice(None))] for m in range(nb))


def _store_row_blocks(ref, tiles, q: int, *lead):
  """ref[*lead] = the nb tiles of q rows (`_row_blocks`' inverse)."""
  if len(tiles) == 1:
    ref[lead if lead else ...] = tiles[0]
    return
  for m, x in enumerate(tiles):
    ref[(*lead, pl.ds(m * q, q), slice(None))] = x


def _sum_states(xs, ys, interp):
  """The sum over states of xs * ys, both given as the same tiles of states (ys may broadcast over
  channels): an fma chain across the tiles, then one tile's sum (`_fwd6_kernel`)."""
  acc = xs[0] * ys[0]
  if len(xs) == 1:
    return jnp.sum(acc, axis=0)
  for x, y in zip(xs[1:], ys[1:], strict=True):
    acc = _fma(y, x, acc, interp)
  return jnp.sum(acc, axis=0)


def _per_state(pieces):
  """Per-state pieces ([q] each) as columns ([q, 1]) to multiply state tiles with."""
  return tuple(p[:, None] for p in pieces)


def _fwd6_kernel(*refs, st: _Static, mode: str):
  """Config.fwd="v6": `_fwd4_kernel`'s modes ("fwd": y, the end state and optionally the chunk
  checkpoints; "state": the end state from zero and the sum of delta) on the v6 tiles, token by token.

  The state is held as d_state / q tiles of [q, block_d] (`_state_rows`): one tile by default;
  with Config.split_states, tiles of the 4 rows that one lane holds at 32 channels a warp (Triton
  repeats its [4, 32] lane grid down the rows), so the lanes hold the same values and y's sum over
  states becomes an fma chain across the tiles plus the cross-lane sum of one tile, instead of a
  product and an add a state (offline SASS at (8, 2048, 5120, 16): 1632 -> 1528 instructions a
  chunk, the same registers, shuffles and barriers).
  """
  r, ck_ref, _ = _fwd_refs(refs, st, mode)
  interp = st.interpret
  T, S = st.cfg.chunk, st.seg_len
  q = _state_rows(st)
  nb = st.n_pad // q
  t_base = pl.program_id(1) * S
  a2 = tuple(x * LOG2E for x in _row_blocks(r["a"], q, nb))   # nb x [q, bd]
  bias = r["bias"][...]
  d_skip = r["d"][...] if mode == "fwd" else None

  n_chunks = S // T
  names = ("u", "dl", "b") + ((("c", "z") if st.has_z else ("c",)) if mode == "fwd" else ())

  def load_chunk(ci):
    return [_load_rows(r, ci * T + i, names, q) for i in range(T)]

  def chunk(ci, carry):
    h, dts, *ahead = carry
    # All of the chunk's loads first, in both modes. "fwd": nothing tells the compiler that the y
    # stores do not alias them, so a load after a store would wait for it. "state" stores nothing,
    # but every token converts its vectors to the tile layout through shared memory, and ptxas does
    # not move a load above the barrier that takes: loaded token by token, each token waited for
    # its own loads (H100 2026-12-05, Nsight Compute; benchmarks/NOTES_selective_scan.md).
    # `prefetch`: this chunk's loads came with the carry, and the next chunk's go out now (the last
    # chunk loads itself again rather than past its block).
    if st.cfg.prefetch:
      ins, ahead = ahead[0], [load_chunk(jnp.minimum(ci + 1, n_chunks - 1))]
    else:
      ins = load_chunk(ci)
    if ck_ref is not None:
      _store_row_blocks(ck_ref, h, q, ci)
    for i in range(T):
      v = _widen(ins[i], bias, ci * T + i, t_base, st)
      u, dt = v["u"], v["dt"]
      h = tuple(_fma(_ex2(dt[None, :] * a2[m], interp), h[m],
                     (dt * u)[None, :] * v["b"][m][:, None], interp) for m in range(nb))
      if mode == "state":
        dts = dts + dt
        continue
      y = _sum_states(h, _per_state(v["c"]), interp) + d_skip * u
      if st.has_z:
        y = y * v["z"] * _sigmoid(v["z"], interp)
      r["y"][ci * T + i, :] = y.astype(r["y"].dtype)
    return (h, dts, *ahead)

  h0 = (tuple(jnp.zeros(x.shape, F32) for x in a2) if mode == "state"
        else _row_blocks(r["h0"], q, nb))
  init = (h0, jnp.zeros(bias.shape, F32)) + ((load_chunk(0),) if st.cfg.prefetch else ())
  h, dts, *_ = jax.lax.fori_loop(0, n_chunks, chunk, init)
  if mode == "state":
    _store_row_blocks(r["hloc"], h, q)
    r["dts"][...] = dts
  else:
    _store_row_blocks(r["hend"], h, q)


def _adjoint6_kernel(*refs, st: _Static):
  """Config.bwd="v6": the segment adjoint pass (as `_bwd4_kernel` mode "adjoint") on the v6 tiles."""
  r, _ = _refs(refs, st, "dl z cc a bias dy gloc dts")      # cc: the packed B/C array, or C
  interp = st.interpret
  T, S = st.cfg.chunk, st.seg_len
  n_chunks = S // T
  t_base = (pl.program_id(1) + 1) * S                       # this grid runs segments 1..P-1
  a2 = r["a"][...] * LOG2E
  bias = r["bias"][...]

  names = ("dl", "dy", "cc") + (("z",) if st.has_z else ())

  def load_chunk(k):
    return [_load_rows(r, (n_chunks - 1 - k) * T + i, names) for i in range(T)]

  def chunk(k, carry):
    g, dts, *ahead = carry
    t0 = (n_chunks - 1 - k) * T
    # The chunk's loads first; `prefetch`: they came with the carry (see `_fwd6_kernel`).
    if st.cfg.prefetch:
      ins, ahead = ahead[0], [load_chunk(jnp.minimum(k + 1, n_chunks - 1))]
    else:
      ins = load_chunk(k)
    for i in reversed(range(T)):
      v = _widen(ins[i], bias, t0 + i, t_base, st)
      dt, dys = v["dt"], v["dy"]
      if st.has_z:
        dys = dys * v["z"] * _sigmoid(v["z"], interp)
      g = _fma(v["c"][:, None], dys[None, :], g, interp)
      g = _ex2(dt[None, :] * a2, interp) * g
      dts = dts + dt
    return (g, dts, *ahead)

  init = ((jnp.zeros(a2.shape, F32), jnp.zeros(bias.shape, F32))
          + ((load_chunk(0),) if st.cfg.prefetch else ()))
  g, dts, *_ = jax.lax.fori_loop(0, n_chunks, chunk, init)
  r["gloc"][...] = g
  r["dts"][...] = dts


def _bwd6_kernel(*refs, st: _Static):
  r, _ = _refs(refs, st, "u dl z b c a d bias ck dy gend du ddl dz dbp dcp da dd dbias dh0")
  interp = st.interpret
  T, S = st.cfg.chunk, st.seg_len
  U = min(_V6_SUB, T)
  n_chunks = S // T
  t_base = pl.program_id(1) * S
  # State, adjoint and dA as nb tiles of q states (one tile by default; `_fwd6_kernel`).
  q = _state_rows(st)
  nb = st.n_pad // q
  a2 = tuple(x * LOG2E for x in _row_blocks(r["a"], q, nb))   # nb x [q, bd]
  d_skip = r["d"][...]
  bias = r["bias"][...]

  # Loads. Nothing tells the compiler that the stores below do not alias the inputs, so a load after
  # a store waits for it; and ptxas moves no load above the barriers of the shared-memory layout
  # conversions that every token takes. So the chunk start loads u, delta and B of all its tokens
  # (the recompute's inputs) and the last sub-chunk's C, dy and z, before any use: the recompute
  # then waits once, not once a token (H100 2026-12-05, Nsight Compute: those waits were a fifth of
  # the kernel's warp-stall samples; benchmarks/NOTES_selective_scan.md). The other sub-chunks load
  # their inputs again (from L1/L2) just before their work: loading them a sub-chunk ahead spills
  # (offline SASS at (8, 2048, 5120, 16): 432 B of stack; so does loading two sub-chunks at the
  # chunk start, 488 B).
  recompute_names = ("u", "dl", "b")                       # what the recompute needs
  sub_names = ("c", "dy") + (("z",) if st.has_z else ())    # what the gradients need besides

  # Raw loads keyed by the token's offset in its chunk: the chunk start's, and (`bwd_prefetch`) the
  # next sub-chunk's C, dy and z; then the current sub-chunk's widened inputs.
  loads, ahead, sub_inputs = {}, {}, {}

  def tok(t0, off):
    if off in sub_inputs:
      return sub_inputs[off]
    return _widen(loads[off], bias, t0 + off, t_base, st)

  def store_state_sums(ref, t, xs, w):
    """ref[t, :] = sum over channels of xs * w[None, :] (xs: nb tiles)."""
    if nb == 1:
      ref[t, :] = jnp.sum(xs[0] * w[None, :], axis=1)
      return
    for m in range(nb):
      ref[t, pl.ds(m * q, q)] = jnp.sum(xs[m] * w[None, :], axis=1)

  def before_sub(t0, j):
    last = j == T // U - 1
    sub_inputs.clear()
    for o in range(j * U, (j + 1) * U):
      if last:
        rows = loads[o]
      elif o in ahead:
        rows = {**_load_rows(r, t0 + o, recompute_names, q), **ahead.pop(o)}
      else:
        rows = _load_rows(r, t0 + o, recompute_names + sub_names, q)
      sub_inputs[o] = _widen(rows, bias, t0 + o, t_base, st)
    # `bwd_prefetch`: the next sub-chunk's C, dy and z go out before this one's work (its u, delta
    # and B were loaded at the chunk start, so they are L1 hits).
    if st.cfg.bwd_prefetch and j > 0:
      ahead.update({o: _load_rows(r, t0 + o, sub_names, q) for o in range((j - 1) * U, j * U)})

  def step(t0, h, off):
    v = tok(t0, off)
    a = tuple(_ex2(v["dt"][None, :] * a2[m], interp) for m in range(nb))
    return a, tuple(_fma(a[m], h[m], (v["dt"] * v["u"])[None, :] * v["b"][m][:, None], interp)
                    for m in range(nb))

  def chunk(k, carry):
    g, d_a, d_d, d_bias = carry
    t0 = (n_chunks - 1 - k) * T
    h = _row_blocks(r["ck"], q, nb, n_chunks - 1 - k)      # the state before token t0
    loads.clear()
    loads.update({o: _load_rows(r, t0 + o, recompute_names + (sub_names if o >= T - U else ()), q)
                  for o in range(T)})
    for j, hs, decays in recompute_sub_chunks(functools.partial(step, t0), h, 0, T, U,
                                              functools.partial(before_sub, t0)):
      for i in reversed(range(U)):
        t = t0 + j * U + i
        v = sub_inputs[j * U + i]
        u, dt, bt, ct, dout = v["u"], v["dt"], v["b"], v["c"], v["dy"]
        if st.has_z:
          zt = v["z"]
          sg = _sigmoid(zt, interp)
          y = _sum_states(hs[i + 1], _per_state(ct), interp) + d_skip * u
          r["dz"][t, :] = (dout * y * sg * (1.0 + zt * (1.0 - sg))).astype(r["dz"].dtype)
          dys = dout * zt * sg
        else:
          dys = dout
        d_d = d_d + dys * u
        g = tuple(_fma(ct[m][:, None], dys[None, :], g[m], interp)   # dL/dh_t
                  for m in range(nb))
        g_prev = tuple(decays[i][m] * g[m] for m in range(nb))  # dL/dh_{t-1} through h_t
        gw = tuple(g_prev[m] * hs[i][m] for m in range(nb))     # g * exp(dt A) h_{t-1}
        d_a = tuple(_fma(gw[m], dt[None, :], d_a[m], interp) for m in range(nb))
        g_b = _sum_states(g, _per_state(bt), interp)
        ddt = _sum_states(gw, a2, interp) * (1.0 / LOG2E) + u * g_b
        r["du"][t, :] = (dys * d_skip + dt * g_b).astype(r["du"].dtype)
        store_state_sums(r["dbp"], t, g, dt * u)
        store_state_sums(r["dcp"], t, hs[i + 1], dys)
        # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)): from dt, without another exp of x.
        dx = ddt * -jnp.expm1(-dt) if st.softplus else ddt
        if st.masked:
          dx = dx * (t_base + t < st.length).astype(F32)
        d_bias = d_bias + dx
        r["ddl"][t, :] = dx.astype(r["ddl"].dtype)
        g = g_prev
    return g, d_a, d_d, d_bias

  zeros = jnp.zeros(bias.shape, F32)
  g, d_a, d_d, d_bias = jax.lax.fori_loop(
      0, n_chunks, chunk, (_row_blocks(r["gend"], q, nb), tuple(jnp.zeros(x.shape, F32) for x in a2),
                           zeros, zeros))
  _store_row_blocks(r["da"], d_a, q)
  _store_row_blocks(r["dh0"], g, q)
  r["dd"][...] = d_d
  r["dbias"][...] = d_bias


# --------------------------------------------------------------------------------------------------
# v7 forward-direction kernels (Config.fwd = "v7"): the state as d_state separate [block_d] vectors,
# one channel a lane (1-D tensors of block_d elements in a block_d-lane program have no other layout).
# v6's [d_state, block_d] tiles get 4 channels x 4 states a lane from jaxlib's Triton, so each
# per-token channel vector is converted into the tile layout through shared memory (with a barrier)
# and y needs two shuffle levels. Here the sum
# over states for y is an fma chain inside the lane and nothing crosses lanes; B_t and C_t are read as
# d_state scalars a token (the same address on every lane; B and C are given in float32 to save a
# conversion a load). Offline SASS at (8, 2048, 1536, 16): 1520 instructions per 8-token chunk
# against v6's 1632, 128 registers against 168, no SHFL or BAR. On the H100 (2026-12-05,
# results/selective_scan_h100_log1p_v7.md) it is slower all the same: forward 0.99 ms against v6's
# 0.67 at that shape, 2.23 against 1.81 at (8, 2048, 5120, 16); every lane issues 2 d_state scalar
# loads a token, one token ahead of use.


def _bc_scalars(r, st: _Static, t, need_c: bool):
  """Token t's B (and C) as d_state scalars each (float32)."""
  n = st.n_pad
  b = [r["b"][t, k].astype(F32) for k in range(n)]
  c = [r["c"][t, k].astype(F32) for k in range(n)] if need_c else None
  return b, c


def _fwd7_kernel(*refs, st: _Static, mode: str):
  """Config.fwd="v7": `_fwd4_kernel`'s modes ("fwd": y, the end state and optionally the chunk
  checkpoints; "state": the end state from zero and the sum of delta) on per-state channel vectors."""
  r, ck_ref, _ = _fwd_refs(refs, st, mode)
  interp = st.interpret
  T, S, n = st.cfg.chunk, st.seg_len, st.n_pad
  t_base = pl.program_id(1) * S
  a2 = [r["a"][k, :] * LOG2E for k in range(n)]            # n x [bd]
  bias = r["bias"][...]
  d_skip = r["d"][...] if mode == "fwd" else None
  fwd = mode == "fwd"

  def chunk(ci, carry):
    h, dts = carry
    t0 = ci * T

    def per_channel(t):
      v = dict(u=r["u"][t, :].astype(F32), dt=_delta(r["dl"], bias, t, t_base, st)[1])
      if fwd and st.has_z:
        v["z"] = r["z"][t, :].astype(F32)
      return v

    # "fwd": the chunk's per-channel inputs first, and each token's B and C one token ahead: nothing
    # tells the compiler that the y stores do not alias them, so a load after a store waits for it.
    chans = [per_channel(t0 + i) for i in range(T)] if fwd else None
    bc_next = _bc_scalars(r, st, t0, fwd) if fwd else None
    if ck_ref is not None:
      for k in range(n):
        ck_ref[ci, k, :] = h[k]
    for i in range(T):
      v = chans[i] if fwd else per_channel(t0 + i)
      if fwd:
        (b, c), bc_next = bc_next, (_bc_scalars(r, st, t0 + i + 1, True) if i + 1 < T else None)
      else:
        b, c = _bc_scalars(r, st, t0 + i, False)
      u, dt = v["u"], v["dt"]
      dtu = dt * u
      y = d_skip * u if fwd else None
      new_h = []
      for k in range(n):
        hk = _fma(_ex2(dt * a2[k], interp), h[k], dtu * b[k], interp)
        new_h.append(hk)
        if fwd:
          y = _fma(hk, c[k], y, interp)
      h = new_h
      if not fwd:
        dts = dts + dt
        continue
      if st.has_z:
        y = y * v["z"] * _sigmoid(v["z"], interp)
      r["y"][t0 + i, :] = y.astype(r["y"].dtype)
    return h, dts

  if fwd:
    h0 = [r["h0"][k, :] for k in range(n)]
  else:
    h0 = [jnp.zeros(bias.shape, F32) for _ in range(n)]
  h, dts = jax.lax.fori_loop(0, S // T, chunk, (h0, jnp.zeros(bias.shape, F32)))
  out = r["hend"] if fwd else r["hloc"]
  for k in range(n):
    out[k, :] = h[k]
  if not fwd:
    r["dts"][...] = dts


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers.


def _params(st: _Static, num_warps: int):
  return plt.CompilerParams(num_warps=num_warps, num_stages=st.cfg.num_stages)


def _specs(st: _Static, bd: int, seg_offset: int = 0):
  """BlockSpecs for grid (j, p, b): token arrays, B/C, channel vectors, state tiles, per-segment."""
  S, n = st.seg_len, st.n_pad
  blocks_per_group = st.d_group_pad // bd
  o = seg_offset
  tok = pl.BlockSpec((None, S, bd), lambda j, p, b: (b, p + o, j))
  grp = pl.BlockSpec((None, S, None, n), lambda j, p, b: (b, p + o, j // blocks_per_group, 0))
  chan = pl.BlockSpec((bd,), lambda j, p, b: (j,))
  tile = pl.BlockSpec((n, bd), lambda j, p, b: (0, j))
  seg_tile = pl.BlockSpec((None, None, n, bd), lambda j, p, b: (b, p + o, 0, j))
  seg_chan = pl.BlockSpec((None, None, bd), lambda j, p, b: (b, p + o, j))
  return tok, grp, chan, tile, seg_tile, seg_chan


def _saves_ypre(st: _Static) -> bool:
  """Whether the forward saves the pre-gate output for the backward (v5 backward with a z gate)."""
  return st.cfg.variant == "v4" and st.cfg.bwd == "v5" and st.has_z


def _fwd_call(st: _Static, u, dl, z, bcs, a, d_skip, bias, h0seg, save_ck: bool):
  bd = st.cfg.block_d
  b, lp, dp, n, P, T = st.batch, st.padded_length, st.d_pad, st.n_pad, st.cfg.segments, st.cfg.chunk
  tok, grp, chan, tile, seg_tile, _ = _specs(st, bd)
  S = st.seg_len
  in_specs = [tok, tok] + ([tok] if st.has_z else []) + [grp] * len(bcs) + [tile, chan, chan, seg_tile]
  args = [u, dl] + ([z] if st.has_z else []) + list(bcs) + [a, d_skip, bias, h0seg]
  out_shape = [jax.ShapeDtypeStruct((b, lp, dp), u.dtype), jax.ShapeDtypeStruct((b, P, n, dp), F32)]
  out_specs = [tok, seg_tile]
  if save_ck:
    out_shape.append(jax.ShapeDtypeStruct((b, lp // T, n, dp), F32))
    out_specs.append(pl.BlockSpec((None, S // T, n, bd), lambda j, p, b: (b, p, 0, j)))
    if _saves_ypre(st):
      out_shape.append(jax.ShapeDtypeStruct((b, lp, dp), F32))
      out_specs.append(tok)
  return pl.pallas_call(
      (functools.partial(_fwd_kernel, st=st, save_ck=save_ck) if st.cfg.variant == "v3"
       else functools.partial(_fwd5_kernel, st=st, mode="fwd") if st.cfg.fwd == "v5"
       else functools.partial(_fwd6_kernel, st=st, mode="fwd") if st.cfg.fwd == "v6"
       else functools.partial(_fwd7_kernel, st=st, mode="fwd") if st.cfg.fwd == "v7"
       else functools.partial(_fwd4_kernel, st=st, mode="fwd")), out_shape=out_shape,
      grid=(dp // bd, P, b), in_specs=in_specs, out_specs=out_specs,
      compiler_params=_params(st, st.cfg.num_warps), interpret=st.interpret,
      name="selective_scan_fwd")(*args)


def _state_call(st: _Static, u, dl, b_or_packed, a, bias):
  bd = st.cfg.block_d
  b, dp, n, P = st.batch, st.d_pad, st.n_pad, st.cfg.segments
  tok, grp, chan, tile, seg_tile, seg_chan = _specs(st, bd)
  return pl.pallas_call(
      (functools.partial(_state_kernel, st=st) if st.cfg.variant == "v3"
       else functools.partial(_fwd5_kernel, st=st, mode="state") if st.cfg.fwd == "v5"
       else functools.partial(_fwd6_kernel, st=st, mode="state") if st.cfg.fwd == "v6"
       else functools.partial(_fwd7_kernel, st=st, mode="state") if st.cfg.fwd == "v7"
       else functools.partial(_fwd4_kernel, st=st, mode="state")),
      out_shape=[jax.ShapeDtypeStruct((b, P - 1, n, dp), F32),
                 jax.ShapeDtypeStruct((b, P - 1, dp), F32)],
      grid=(dp // bd, P - 1, b), in_specs=[tok, tok, grp, tile, chan],
      out_specs=[seg_tile, seg_chan], compiler_params=_params(st, st.cfg.num_warps),
      interpret=st.interpret, name="selective_scan_state")(u, dl, b_or_packed, a, bias)


def _adjoint_call(st: _Static, dl, z, c_or_packed, a, bias, dy):
  bd = st.cfg.block_d
  b, dp, n, P = st.batch, st.d_pad, st.n_pad, st.cfg.segments
  tok, grp, chan, tile, _, _ = _specs(st, bd, seg_offset=1)
  seg_tile = pl.BlockSpec((None, None, n, bd), lambda j, p, b: (b, p, 0, j))
  seg_chan = pl.BlockSpec((None, None, bd), lambda j, p, b: (b, p, j))
  in_specs = [tok] + ([tok] if st.has_z else []) + [grp, tile, chan, tok]
  args = [dl] + ([z] if st.has_z else []) + [c_or_packed, a, bias, dy]
  return pl.pallas_call(
      (functools.partial(_adjoint_kernel, st=st) if st.cfg.variant == "v3"
       else functools.partial(_adjoint5_kernel, st=st) if st.cfg.bwd == "v5"
       else functools.partial(_adjoint6_kernel, st=st) if st.cfg.bwd == "v6"
       else functools.partial(_bwd4_kernel, st=st, mode="adjoint")),
      out_shape=[jax.ShapeDtypeStruct((b, P - 1, n, dp), F32),
                 jax.ShapeDtypeStruct((b, P - 1, dp), F32)],
      grid=(dp // bd, P - 1, b), in_specs=in_specs, out_specs=[seg_tile, seg_chan],
      compiler_params=_params(st, st.cfg.num_warps), interpret=st.interpret,
      name="selective_scan_adjoint")(*args)


def _bwd_call(st: _Static, u, dl, z, bcs, a, d_skip, bias, ck, dy, gend, ypre=None):
  bd = st.cfg.bwd_block_d
  b, lp, dp, n, P, T = st.batch, st.padded_length, st.d_pad, st.n_pad, st.cfg.segments, st.cfg.chunk
  S = st.seg_len
  nblk = dp // bd
  tok, grp, chan, tile, seg_tile, seg_chan = _specs(st, bd)
  ck_spec = pl.BlockSpec((None, S // T, n, bd), lambda j, p, b: (b, p, 0, j))
  part = pl.BlockSpec((None, S, None, n), lambda j, p, b: (b, p, j, 0))
  in_specs = ([tok, tok] + ([tok] if st.has_z else []) + [grp] * len(bcs)
              + [tile, chan, chan, ck_spec, tok, seg_tile])
  args = [u, dl] + ([z] if st.has_z else []) + list(bcs) + [a, d_skip, bias, ck, dy, gend]
  if ypre is not None:
    in_specs.append(tok)
    args.append(ypre)
  out_shape = [jax.ShapeDtypeStruct((b, lp, dp), u.dtype), jax.ShapeDtypeStruct((b, lp, dp), dl.dtype)]
  out_specs = [tok, tok]
  if st.has_z:
    out_shape.append(jax.ShapeDtypeStruct((b, lp, dp), z.dtype))
    out_specs.append(tok)
  out_shape += [jax.ShapeDtypeStruct((b, lp, nblk, n), F32), jax.ShapeDtypeStruct((b, lp, nblk, n), F32),
                jax.ShapeDtypeStruct((b, P, n, dp), F32), jax.ShapeDtypeStruct((b, P, dp), F32),
                jax.ShapeDtypeStruct((b, P, dp), F32), jax.ShapeDtypeStruct((b, P, n, dp), F32)]
  out_specs += [part, part, seg_tile, seg_chan, seg_chan, seg_tile]
  return pl.pallas_call(
      (functools.partial(_bwd_kernel, st=st) if st.cfg.variant == "v3"
       else functools.partial(_bwd5_kernel, st=st) if st.cfg.bwd == "v5"
       else functools.partial(_bwd6_kernel, st=st) if st.cfg.bwd == "v6"
       else functools.partial(_bwd4_kernel, st=st, mode="bwd")), out_shape=out_shape,
      grid=(nblk, P, b),
      in_specs=in_specs, out_specs=out_specs, compiler_params=_params(st, st.cfg.bwd_num_warps),
      interpret=st.interpret, name="selective_scan_bwd")(*args)


# --------------------------------------------------------------------------------------------------
# custom_vjp over the padded canonical arrays:
#   u, dl, z [b, Lp, Dp]; bm, cm [b, Lp, G, Np]; a [Np, Dp] f32; d_skip, bias [Dp] f32; h0 [b, Np, Dp] f32.


def _bcs(st: _Static, bm, cm):
  """The B/C arrays the kernels read: one packed uint32 array for bf16, else B and C."""
  return [_pack_bc(bm, cm)] if st.packed_bc else [bm, cm]


def _segment_starts(st: _Static, u, dl, bcs, a, bias, h0):
  """[b, P, Np, Dp]: the state entering each segment (first pass + `_hand_over`)."""
  if st.cfg.segments == 1:
    return h0[:, None]
  hloc, dts = _state_call(st, u, dl, bcs[0], a, bias)      # segments 0..P-2
  return _hand_over(a, hloc, dts, h0, reverse=False)


# Up to this many segments the hand-over between segments is unrolled into one XLA fusion; a
# `lax.scan` there is a while loop whose every step launches kernels and reads its predicate back to
# the host (offline thunk sequence at (8, 2048, 1536, 16), 8 segments: two while loops of 7 steps).
_UNROLL_SEGMENTS = 64


def _hand_over(a, loc, dts, edge, reverse: bool):
  """The true state (forward) or adjoint (backward, `reverse`) at every segment boundary.

  loc [b, P-1, Np, Dp] and dts [b, P-1, Dp] are the first pass's per-segment results from a zero
  start, `edge` [b, Np, Dp] the value at the outer end (the initial state, or the final state's
  cotangent). Returns [b, P, Np, Dp]: forward, the state entering each segment,
  x_0 = edge, x_{p+1} = exp(A dts_p) x_p + loc_p; reverse, the adjoint at each segment's end,
  x_{P-1} = edge, x_p = exp(A dts_p) x_{p+1} + loc_p (loc_p, dts_p of segment p + 1)."""
  n_loc = loc.shape[1]
  decay = jnp.exp(a[None, None] * dts[:, :, None, :])      # [b, P-1, Np, Dp]
  if n_loc + 1 <= _UNROLL_SEGMENTS:
    xs = [edge]
    for p in (reversed(range(n_loc)) if reverse else range(n_loc)):
      xs.append(decay[:, p] * xs[-1] + loc[:, p])
    return jnp.stack(xs[::-1] if reverse else xs, axis=1)

  # The edge enters as the input of a step with decay 0 (first in scan order).
  zero, edge = jnp.zeros_like(decay[:, :1]), edge[:, None]
  ends = (lambda x, e: (x, e)) if reverse else (lambda x, e: (e, x))
  return linear_recurrence(jnp.concatenate(ends(decay, zero), axis=1),
                           jnp.concatenate(ends(loc, edge), axis=1), axis=1, reverse=reverse)[1]


def _forward(st: _Static, u, dl, z, bm, cm, a, d_skip, bias, h0, save_ck: bool):
  if st.cfg.fwd == "v7":
    # v7 reads B_t and C_t as scalars, the same on every lane: float32 saves a conversion per load.
    bm, cm = bm.astype(F32), cm.astype(F32)
  bcs = _bcs(st, bm, cm)
  h0seg = _segment_starts(st, u, dl, bcs, a, bias, h0)
  return _fwd_call(st, u, dl, z, bcs, a, d_skip, bias, h0seg, save_ck)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st: _Static, u, dl, z, bm, cm, a, d_skip, bias, h0):
  y, hend = _forward(st, u, dl, z, bm, cm, a, d_skip, bias, h0, save_ck=False)
  return y, hend[:, -1]


def _scan_fwd(st: _Static, u, dl, z, bm, cm, a, d_skip, bias, h0):
  y, hend, ck, *ypre = _forward(st, u, dl, z, bm, cm, a, d_skip, bias, h0, save_ck=True)
  return (y, hend[:, -1]), (u, dl, z, bm, cm, a, d_skip, bias, ck, h0, *ypre)


def _scan_bwd(st: _Static, res, cts):
  u, dl, z, bm, cm, a, d_skip, bias, ck, h0, *ypre = res
  dy, dh_final = cts
  dy = dy.astype(u.dtype)
  dh_final = dh_final.astype(F32)
  P = st.cfg.segments
  bcs = _bcs(st, bm, cm)
  if P == 1:
    gend = dh_final[:, None]
  else:
    gloc, dts = _adjoint_call(st, dl, z, bcs[-1], a, bias, dy)   # segments 1..P-1
    gend = _hand_over(a, gloc, dts, dh_final, reverse=True)
  outs = _bwd_call(st, u, dl, z, bcs, a, d_skip, bias, ck, dy, gend, *ypre)
  du, ddl = outs[0], outs[1]
  dz = outs[2] if st.has_z else None
  dbp, dcp, dap, ddp, dbiasp, dh0p = outs[3:] if st.has_z else outs[2:]
  b, lp, G, n = bm.shape
  per_group = dbp.shape[2] // G
  d_bm = dbp.reshape(b, lp, G, per_group, n).sum(3).astype(bm.dtype)
  d_cm = dcp.reshape(b, lp, G, per_group, n).sum(3).astype(cm.dtype)
  return (du, ddl, dz, d_bm, d_cm, dap.sum((0, 1)), ddp.sum((0, 1)), dbiasp.sum((0, 1)),
          dh0p[:, 0].astype(h0.dtype))


_scan.defvjp(_scan_fwd, _scan_bwd)


# --------------------------------------------------------------------------------------------------
# Public entry (the registry's fn): padding to the canonical layout and back.


def _pad_channels(x: jax.Array, axis: int, groups: int, group_pad: int) -> jax.Array:
  """Pads each of the `groups` equal slices of `axis` to `group_pad` entries (zeros at the end)."""
  d = x.shape[axis]
  width = d // groups
  if width == group_pad:
    return x
  shape = x.shape[:axis] + (groups, width) + x.shape[axis + 1:]
  pads = [(0, 0)] * (len(shape))
  pads[axis + 1] = (0, group_pad - width)
  x = jnp.pad(x.reshape(shape), pads)
  return x.reshape(x.shape[:axis] + (groups * group_pad,) + x.shape[axis + 2:])


def _unpad_channels(x: jax.Array, axis: int, groups: int, width: int) -> jax.Array:
  group_pad = x.shape[axis] // groups
  if width == group_pad:
    return x
  shape = x.shape[:axis] + (groups, group_pad) + x.shape[axis + 1:]
  x = jax.lax.slice_in_dim(x.reshape(shape), 0, width, axis=axis + 1)
  return x.reshape(x.shape[:axis] + (groups * width,) + x.shape[axis + 2:])


def selective_scan_pallas(u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                          delta_softplus=False, initial_state=None, return_final_state=False,
                          config: Config | None = None):
  """The selective scan of `ssm_lab.ops.selective_scan` through the Pallas kernels.

  Args are the op's (validated; B, C as [batch, length, n_groups, d_state]). `config` overrides the
  tiling chosen by `default_config` (benchmarks and tests use it).

  Returns:
    y [batch, length, d_inner] in u's dtype, or (y, final_state [batch, d_inner, d_state] float32).
  """
  batch, length, d_inner = u.shape
  d_state = A.shape[1]
  groups = B.shape[2]
  cfg = default_config(batch, length, d_inner, d_state, groups, config)
  d_group = d_inner // groups
  n_pad = _padded_d_state(d_state)
  block_max = max(cfg.block_d, cfg.bwd_block_d)
  d_group_pad = -(-d_group // block_max) * block_max
  step = cfg.unroll * cfg.segments
  padded_length = -(-length // step) * step
  st = _Static(batch=batch, length=length, padded_length=padded_length,
               d_pad=groups * d_group_pad, d_group_pad=d_group_pad, n_pad=n_pad, n_groups=groups,
               has_z=z is not None, softplus=bool(delta_softplus),
               packed_bc=((cfg.variant == "v3" or cfg.pack_bc) and B.dtype == jnp.bfloat16
                          and C.dtype == jnp.bfloat16), cfg=cfg,
               interpret=interpret_mode())

  def tokens(x):                                            # [b, L, D] -> [b, Lp, Dp]
    x = _pad_channels(x, 2, groups, d_group_pad)
    return jnp.pad(x, ((0, 0), (0, padded_length - length), (0, 0)))

  def group_inputs(x):                                      # [b, L, G, N] -> [b, Lp, G, Np]
    return jnp.pad(x, ((0, 0), (0, padded_length - length), (0, 0), (0, n_pad - d_state)))

  def channel_vec(x):
    x = jnp.zeros((d_inner,), F32) if x is None else x.astype(F32)
    return _pad_channels(x, 0, groups, d_group_pad)

  a = _pad_channels(jnp.pad(A.astype(F32), ((0, 0), (0, n_pad - d_state))), 0, groups, d_group_pad).T
  if initial_state is None:
    h0 = jnp.zeros((batch, n_pad, st.d_pad), F32)
  else:
    h0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, n_pad - d_state)))
    h0 = jnp.swapaxes(_pad_channels(h0, 1, groups, d_group_pad), 1, 2)
  y, h_final = _scan(st, tokens(u), tokens(delta), None if z is None else tokens(z),
                     group_inputs(B), group_inputs(C), a, channel_vec(D), channel_vec(delta_bias), h0)
  y = _unpad_channels(y[:, :length], 2, groups, d_group)
  if not return_final_state:
    return y
  h_final = _unpad_channels(jnp.swapaxes(h_final, 1, 2), 1, groups, d_group)[:, :, :d_state]
  return y, h_final


def _registry_fn(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus, initial_state,
                 return_final_state):
  return selective_scan_pallas(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                               delta_softplus=delta_softplus, initial_state=initial_state,
                               return_final_state=return_final_state)


REGISTRY.register(reg.Impl("pallas", _registry_fn, supports, auto_priority={"gpu": 20}))


def padded_sizes(batch: int, length: int, d_inner: int, d_state: int, n_groups: int = 1,
                 config: Config | None = None) -> dict[str, Any]:
  """The padded problem the kernels see (for benchmarks' byte counts and tests)."""
  cfg = default_config(batch, length, d_inner, d_state, n_groups, config)
  block_max = max(cfg.block_d, cfg.bwd_block_d)
  d_group_pad = -(-(d_inner // n_groups) // block_max) * block_max
  step = cfg.unroll * cfg.segments
  return dict(config=cfg, padded_length=-(-length // step) * step, d_pad=n_groups * d_group_pad,
              n_pad=_padded_d_state(d_state), checkpoints=-(-length // step) * step // cfg.chunk)
