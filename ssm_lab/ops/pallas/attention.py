"""FlashAttention-2 forward and backward as Pallas (Triton) kernels, registered as attention impl "pallas".

Written from Dao et al. 2022 (FlashAttention) and Dao 2023 (FlashAttention-2): the [q_len, kv_len] logit
matrix never reaches HBM. Forward: one program per (query block, batch*head) streams the key/value
blocks through an online softmax in float32 and saves the row log-sum-exp. Backward, FA2 style in two
kernels: dK/dV with one program per (kv block, batch*kv_head) that loops over the query heads of its
group and over the query blocks that see the kv block; dQ with one program per (query block,
batch*head) that loops over kv blocks. delta = rowsum(dO * O) comes from XLA. Logits are kept in the
log2 domain (scale * log2(e) folded in) so the kernels call exp2.

Masking is by position (the contract of `ssm_lab.ops.attention`: query i sits at i + kv_len - q_len):
  * the kv-block loop of a query block runs only over blocks holding at least one visible key, so causal
    attention does about half the work and a sliding window of w costs O(L * w), not O(L^2);
  * that range is split into blocks where every (query, key) pair is visible, which skip the mask
    arithmetic, and the few boundary blocks that apply it;
  * segment ids mask every block (no block skipping across segments).
Lengths that are not multiples of the block sizes are padded in the wrapper; padded keys are masked by
position, padded query rows are sliced off (their dO is zero, so they add nothing to dK/dV).

Layout stays the contract's [batch, length, heads, head_dim]: a block is `block` rows of one head, read
with the head stride, so no transposes surround the kernels. GQA/MQA: the kv head of query head h is
h // (heads // kv_heads), chosen in the BlockSpec index maps; dK/dV sum the group inside the kernel.

Supports head_dim 64 or 128, float32 and bfloat16, causal and non-causal, sliding windows, segment ids,
q_len != kv_len. Softmax statistics and accumulators are float32; with float32 inputs the matmuls run
in TF32 on the GPU (Triton's default for a float32 dot, like XLA's default GPU matmul precision):
rel. error about 4e-4 against the float32 reference on the H100. Off the GPU it runs in Pallas
interpret mode (exact float32; slow; how CI tests it).

H100 (bf16, causal, 16 heads, 32K tokens, fwd+bwd, benchmarks/results/attention.md): 1.03 / 3.24 /
11.7 / 89 ms at L = 1K / 4K / 16K / 64K for head_dim 64 (233-346 TFLOP/s; 0.93-1.30x cuDNN's time,
0.38-0.41x that of JAX's Pallas mha); a 1024-token sliding window at 64K runs 24x faster than full
causal (3.6 ms).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import typing

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ssm_lab.ops import registry as reg
from ssm_lab.ops.pallas import interpret_mode

# `ssm_lab.ops.attention` the attribute is the public function; the module is in sys.modules.
attn_op = importlib.import_module("ssm_lab.ops.attention")

LOG2E = math.log2(math.e)
# Running max before any visible key: finite, so exp2(m_old - m_new) never sees inf - inf.
_M_INIT = -1e30
SUPPORTED_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tile sizes and Triton launch parameters of one kernel.

  block_major: rows owned by one program (query rows for fwd/dQ, key rows for dK/dV).
  block_minor: rows per step of the inner loop (keys for fwd/dQ, queries for dK/dV).
  """

  block_major: int
  block_minor: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  fwd: KernelConfig
  dkdv: KernelConfig
  dq: KernelConfig
  # Grid order: True puts the block index on the fastest-launched grid axis, so programs running at
  # the same time share one head's K/V in L2; False puts batch*heads there.
  blocks_fastest: bool = True


def default_config(head_dim: int) -> FlashConfig:
  """Tiles chosen on the H100 by benchmarks/attention.py at L=16384 (benchmarks/results/attention.md,
  "Pallas tile tuning"; notes in benchmarks/NOTES_attention.md)."""
  if head_dim <= 64:
    return FlashConfig(fwd=KernelConfig(128, 64, 8, 3), dkdv=KernelConfig(64, 64, 4, 3),
                       dq=KernelConfig(64, 64, 4, 3))
  return FlashConfig(fwd=KernelConfig(128, 64, 4, 2), dkdv=KernelConfig(64, 64, 4, 2),
                     dq=KernelConfig(64, 64, 4, 2))


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on (hashable: it is a custom_vjp nondiff argument)."""

  batch: int
  heads: int
  kv_heads: int
  head_dim: int
  q_len: int         # true lengths; the arrays the kernels see are padded to q_pad / kv_pad
  kv_len: int
  q_pad: int
  kv_pad: int
  causal: bool
  window: int | None
  has_seg: bool
  scale: float
  cfg: FlashConfig
  interpret: bool

  @property
  def groups(self) -> int:
    return self.heads // self.kv_heads

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len


# ------------------------------------------------------------------------------------------------
# Block ranges. All are int32 scalars; divisions only ever see non-negative numerators.

def _cdiv(a, b: int):
  return lax.div(a + (b - 1), b)


def _kv_range(q_start, bq: int, bk: int, s: _Static):
  """kv blocks [lo, hi) a query block must visit, and the all-visible sub-range [flo, fhi)."""
  qpos_min = q_start + s.offset
  qpos_max = q_start + bq - 1 + s.offset
  n_full_kv = s.kv_len // bk  # blocks with no padded key
  if s.causal:
    hi_key = jnp.minimum(qpos_max, s.kv_len - 1)
    hi = _cdiv(jnp.maximum(hi_key + 1, 0), bk)
    fhi = jnp.minimum(lax.div(jnp.maximum(qpos_min + 1, 0), bk), n_full_kv)
    if s.window is not None:
      lo_key = jnp.maximum(qpos_min - s.window + 1, 0)
      lo = lax.div(lo_key, bk)
      flo = _cdiv(jnp.maximum(qpos_max - s.window + 1, 0), bk)
      hi = jnp.where(hi_key < lo_key, lo, hi)  # the whole window lies past the last key
    else:
      lo = jnp.int32(0)
      flo = jnp.int32(0)
  else:
    lo = jnp.int32(0)
    hi = jnp.int32(-(-s.kv_len // bk))
    flo = jnp.int32(0)
    fhi = jnp.int32(n_full_kv)
  hi = jnp.maximum(hi, lo)
  if s.has_seg:
    flo, fhi = hi, hi
  flo = jnp.clip(flo, lo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return lo, flo, fhi, hi


def _q_range(k_start, bk: int, bq: int, s: _Static):
  """q blocks [lo, hi) that see a kv block, and the sub-range [flo, fhi) that sees all of it."""
  k_end = k_start + bk - 1
  n_q = -(-s.q_len // bq)
  if s.causal:
    first_row = jnp.maximum(k_start - s.offset, 0)
    lo = lax.div(first_row, bq)
    flo = _cdiv(jnp.maximum(k_end - s.offset, 0), bq)
    if s.window is not None:
      last_row = jnp.minimum(k_end + s.window - 1 - s.offset, s.q_len - 1)
      hi = _cdiv(jnp.maximum(last_row + 1, 0), bq)
      hi = jnp.where(last_row < first_row, lo, hi)
      fhi = lax.div(jnp.maximum(k_start + s.window - s.offset, 0), bq)
    else:
      hi = jnp.int32(n_q)
      fhi = jnp.int32(n_q)
  else:
    lo = jnp.int32(0)
    flo = jnp.int32(0)
    hi = jnp.int32(n_q)
    fhi = jnp.int32(n_q)
  # A kv block past the last key sees nothing; one holding padded keys is never all-visible.
  hi = jnp.where(k_start >= s.kv_len, lo, jnp.maximum(hi, lo))
  if s.has_seg:
    flo, fhi = hi, hi
  fhi = jnp.where(k_end >= s.kv_len, lo, fhi)
  flo = jnp.clip(flo, lo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return lo, flo, fhi, hi


def _visible(qpos, kpos, s: _Static, seg_q=None, seg_k=None):
  """qpos, kpos broadcastable int32 arrays of absolute positions -> bool mask."""
  ok = kpos < s.kv_len
  if s.causal:
    ok = ok & (kpos <= qpos)
    if s.window is not None:
      ok = ok & (kpos > qpos - s.window)
  if seg_q is not None:
    ok = ok & (seg_q == seg_k)
  return ok


def _grid(n_blocks: int, n_bh: int, s: _Static):
  return (n_blocks, n_bh) if s.cfg.blocks_fastest else (n_bh, n_blocks)


def _ids(i, j, s: _Static):
  """Grid indices -> (block index as launched, batch*head index)."""
  return (i, j) if s.cfg.blocks_fastest else (j, i)


def _dot_nt(a, b):
  """a [m, k] @ b[n, k]^T -> [m, n] in float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------------
# Forward.

def _q_block(s: _Static, n_q_blocks: int, launched):
  # Causal: the last query blocks carry the most kv blocks; launching them first shortens the tail.
  return (n_q_blocks - 1 - launched) if s.causal else launched


def _fwd_kernel(*refs, s: _Static):
  if s.has_seg:
    q_ref, k_ref, v_ref, sq_ref, sk_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    sq_ref = sk_ref = None
  kc = s.cfg.fwd
  bq, bk = kc.block_major, kc.block_minor
  n_qb = s.q_pad // bq
  launched, _ = _ids(pl.program_id(0), pl.program_id(1), s)
  qb = _q_block(s, n_qb, launched)
  q_start = qb * bq
  q = q_ref[...]
  qpos = q_start + s.offset + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  seg_q = sq_ref[...][:, None] if s.has_seg else None
  lo, flo, fhi, hi = _kv_range(q_start, bq, bk, s)
  qk_scale = s.scale * LOG2E

  def body(j, carry, masked):
    acc, m, denom = carry
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    logits = _dot_nt(q, k) * qk_scale
    if masked:
      kpos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      seg_k = sk_ref[pl.ds(start, bk)][None, :] if s.has_seg else None
      logits = jnp.where(_visible(qpos, kpos, s, seg_q, seg_k), logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(logits - m_new[:, None])
    denom = denom * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, denom

  carry = (jnp.zeros((bq, s.head_dim), jnp.float32), jnp.full((bq,), _M_INIT, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  carry = lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
  carry = lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)
  acc, m, denom = carry
  empty = denom == 0.0
  denom = jnp.where(empty, 1.0, denom)
  o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
  # An empty row gets +inf, so the backward's exp2(-inf - lse) is 0, never NaN.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(denom))


class _QMajor(typing.NamedTuple):
  """Grid layout of the kernels that give each program one query block (forward and dQ)."""

  bq: int
  n_qb: int
  q_map: typing.Callable
  lse_map: typing.Callable
  in_specs: list
  args: list


def _q_major(q, k, v, seg, s: _Static, kc) -> _QMajor:
  """Index maps and the q, k, v (and segment id) input specs shared by the forward and dQ calls."""
  bq = kc.block_major
  n_qb = s.q_pad // bq
  heads, groups, d = s.heads, s.groups, s.head_dim

  def split(i, j):
    launched, bh = _ids(i, j, s)
    return _q_block(s, n_qb, launched), bh // heads, bh % heads

  def q_map(i, j):
    qb, b, h = split(i, j)
    return b, qb, h, 0

  def kv_map(i, j):
    _, b, h = split(i, j)
    return b, 0, h // groups, 0

  def lse_map(i, j):
    qb, b, h = split(i, j)
    return b, h, qb

  in_specs = [pl.BlockSpec((None, bq, None, d), q_map),
              pl.BlockSpec((None, s.kv_pad, None, d), kv_map),
              pl.BlockSpec((None, s.kv_pad, None, d), kv_map)]
  args = [q, k, v]
  if s.has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda i, j: q_map(i, j)[:2]),
                 pl.BlockSpec((None, s.kv_pad), lambda i, j: (split(i, j)[1], 0))]
    args += [_pad_seg(seg, s.q_pad), _pad_seg(seg, s.kv_pad)]
  return _QMajor(bq, n_qb, q_map, lse_map, in_specs, args)


def _fwd_call(q, k, v, seg, s: _Static):
  kc = s.cfg.fwd
  bq, n_qb, q_map, lse_map, in_specs, args = _q_major(q, k, v, seg, s, kc)
  heads, d = s.heads, s.head_dim
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((s.batch, heads, s.q_pad), jnp.float32)]
  out_specs = [pl.BlockSpec((None, bq, None, d), q_map),
               pl.BlockSpec((None, None, bq), lse_map)]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, s=s), out_shape=out_shape,
      grid=_grid(n_qb, s.batch * heads, s), in_specs=in_specs, out_specs=out_specs,
      compiler_params=plt.CompilerParams(num_warps=kc.num_warps, num_stages=kc.num_stages),
      interpret=s.interpret, name="flash_attention_fwd")(*args)


def _pad_seg(seg, length: int):
  """Segment ids [batch, q_len == kv_len] padded to the padded q or kv length (pads are masked
  by position anyway)."""
  return jnp.pad(seg, ((0, 0), (0, length - seg.shape[1])), constant_values=-1)


# ------------------------------------------------------------------------------------------------
# Backward: dQ.

def _dq_kernel(*refs, s: _Static):
  if s.has_seg:
    q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    sq_ref = sk_ref = None
  kc = s.cfg.dq
  bq, bk = kc.block_major, kc.block_minor
  n_qb = s.q_pad // bq
  launched, _ = _ids(pl.program_id(0), pl.program_id(1), s)
  qb = _q_block(s, n_qb, launched)
  q_start = qb * bq
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  qpos = q_start + s.offset + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  seg_q = sq_ref[...][:, None] if s.has_seg else None
  lo, flo, fhi, hi = _kv_range(q_start, bq, bk, s)
  qk_scale = s.scale * LOG2E

  def body(j, dq, masked):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    logits = _dot_nt(q, k) * qk_scale
    if masked:
      kpos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      seg_k = sk_ref[pl.ds(start, bk)][None, :] if s.has_seg else None
      logits = jnp.where(_visible(qpos, kpos, s, seg_q, seg_k), logits, -jnp.inf)
    p = jnp.exp2(logits - lse)
    dp = _dot_nt(do, v)
    ds = p * (dp - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros((bq, s.head_dim), jnp.float32)
  dq = lax.fori_loop(lo, flo, functools.partial(body, masked=True), dq)
  dq = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(fhi, hi, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * s.scale).astype(dq_ref.dtype)


def _dq_call(q, k, v, seg, do, lse, delta, s: _Static):
  kc = s.cfg.dq
  bq, n_qb, q_map, lse_map, in_specs, args = _q_major(q, k, v, seg, s, kc)
  heads, d = s.heads, s.head_dim
  in_specs += [pl.BlockSpec((None, bq, None, d), q_map),
               pl.BlockSpec((None, None, bq), lse_map),
               pl.BlockSpec((None, None, bq), lse_map)]
  args += [do, lse, delta]
  return pl.pallas_call(
      functools.partial(_dq_kernel, s=s), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=_grid(n_qb, s.batch * heads, s), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, d), q_map),
      compiler_params=plt.CompilerParams(num_warps=kc.num_warps, num_stages=kc.num_stages),
      interpret=s.interpret, name="flash_attention_dq")(*args)


# ------------------------------------------------------------------------------------------------
# Backward: dK, dV (transposed logits [block_k, block_q], so no transposes of the big operands).

def _dkdv_kernel(*refs, s: _Static):
  if s.has_seg:
    q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    sq_ref = sk_ref = None
  kc = s.cfg.dkdv
  bk, bq = kc.block_major, kc.block_minor
  kb, _ = _ids(pl.program_id(0), pl.program_id(1), s)
  k_start = kb * bk
  k = k_ref[...]
  v = v_ref[...]
  kpos = k_start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
  seg_k = sk_ref[...][:, None] if s.has_seg else None
  lo, flo, fhi, hi = _q_range(k_start, bk, bq, s)
  qk_scale = s.scale * LOG2E

  def body(i, carry, g, masked):
    dk, dv = carry
    start = pl.multiple_of(i * bq, bq)
    q = q_ref[pl.ds(start, bq), g, :]
    do = do_ref[pl.ds(start, bq), g, :]
    lse = lse_ref[g, pl.ds(start, bq)][None, :]
    delta = delta_ref[g, pl.ds(start, bq)][None, :]
    logits_t = _dot_nt(k, q) * qk_scale
    if masked:
      qpos = start + s.offset + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
      seg_q = sq_ref[pl.ds(start, bq)][None, :] if s.has_seg else None
      logits_t = jnp.where(_visible(qpos, kpos, s, seg_q, seg_k), logits_t, -jnp.inf)
    p_t = jnp.exp2(logits_t - lse)
    dv = dv + _dot(p_t.astype(do.dtype), do)
    dp_t = _dot_nt(v, do)
    ds_t = p_t * (dp_t - delta)
    dk = dk + _dot(ds_t.astype(q.dtype), q)
    return dk, dv

  def one_head(g, carry):
    carry = lax.fori_loop(lo, flo, functools.partial(body, g=g, masked=True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(body, g=g, masked=False), carry)
    return lax.fori_loop(fhi, hi, functools.partial(body, g=g, masked=True), carry)

  zeros = jnp.zeros((bk, s.head_dim), jnp.float32)
  if s.groups == 1:
    dk, dv = one_head(0, (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, s.groups, one_head, (zeros, zeros))
  dk_ref[...] = (dk * s.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_call(q, k, v, seg, do, lse, delta, s: _Static):
  kc = s.cfg.dkdv
  bk = kc.block_major
  n_kb = s.kv_pad // bk
  kv_heads, groups, d = s.kv_heads, s.groups, s.head_dim

  def split(i, j):
    kb, bh = _ids(i, j, s)
    return kb, bh // kv_heads, bh % kv_heads

  def k_map(i, j):
    kb, b, h = split(i, j)
    return b, kb, h, 0

  def q_map(i, j):
    _, b, h = split(i, j)
    return b, 0, h, 0

  def lse_map(i, j):
    _, b, h = split(i, j)
    return b, h, 0

  in_specs = [pl.BlockSpec((None, s.q_pad, groups, d), q_map),
              pl.BlockSpec((None, bk, None, d), k_map),
              pl.BlockSpec((None, bk, None, d), k_map)]
  args = [q, k, v]
  if s.has_seg:
    in_specs += [pl.BlockSpec((None, s.q_pad), lambda i, j: (split(i, j)[1], 0)),
                 pl.BlockSpec((None, bk), lambda i, j: k_map(i, j)[:2])]
    args += [_pad_seg(seg, s.q_pad), _pad_seg(seg, s.kv_pad)]
  in_specs += [pl.BlockSpec((None, s.q_pad, groups, d), q_map),
               pl.BlockSpec((None, groups, s.q_pad), lse_map),
               pl.BlockSpec((None, groups, s.q_pad), lse_map)]
  args += [do, lse, delta]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [pl.BlockSpec((None, bk, None, d), k_map), pl.BlockSpec((None, bk, None, d), k_map)]
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, s=s), out_shape=out_shape,
      grid=_grid(n_kb, s.batch * kv_heads, s), in_specs=in_specs, out_specs=out_specs,
      compiler_params=plt.CompilerParams(num_warps=kc.num_warps, num_stages=kc.num_stages),
      interpret=s.interpret, name="flash_attention_dkdv")(*args)


# ------------------------------------------------------------------------------------------------
# custom_vjp on padded arrays.

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, s: _Static):
  return _fwd_call(q, k, v, seg, s)[0]


def _flash_fwd(q, k, v, seg, s: _Static):
  out, lse = _fwd_call(q, k, v, seg, s)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(s: _Static, res, do):
  q, k, v, seg, out, lse = res
  do = do.astype(q.dtype)
  delta = jnp.einsum("blhd,blhd->bhl", do.astype(jnp.float32), out.astype(jnp.float32))
  dq = _dq_call(q, k, v, seg, do, lse, delta, s)
  dk, dv = _dkdv_call(q, k, v, seg, do, lse, delta, s)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _fit(cfg: FlashConfig, q_len: int, kv_len: int) -> FlashConfig:
  """Shrinks tiles to the (power-of-two rounded) lengths of short sequences; never below 16."""
  def cap(n, length):
    return max(16, min(n, pl.next_power_of_2(length)))
  return dataclasses.replace(
      cfg,
      fwd=dataclasses.replace(cfg.fwd, block_major=cap(cfg.fwd.block_major, q_len),
                              block_minor=cap(cfg.fwd.block_minor, kv_len)),
      dq=dataclasses.replace(cfg.dq, block_major=cap(cfg.dq.block_major, q_len),
                             block_minor=cap(cfg.dq.block_minor, kv_len)),
      dkdv=dataclasses.replace(cfg.dkdv, block_major=cap(cfg.dkdv.block_major, kv_len),
                               block_minor=cap(cfg.dkdv.block_minor, q_len)))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    sliding_window: int | None = None, segment_ids: jax.Array | None = None,
                    scale: float | None = None, config: FlashConfig | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """The Pallas kernel behind `attention(..., impl="pallas")`, callable with explicit tiles.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] (validated
      inputs, see `ssm_lab.ops.attention`). segment_ids: [batch, length] or None.
    config: tiles; default `default_config(head_dim)`. interpret: default: off the GPU.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype; differentiable in q, k, v.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  cfg = _fit(config or default_config(head_dim), q_len, kv_len)
  q_mult = max(cfg.fwd.block_major, cfg.dq.block_major, cfg.dkdv.block_minor)
  kv_mult = max(cfg.fwd.block_minor, cfg.dq.block_minor, cfg.dkdv.block_major)
  q_pad, kv_pad = _round_up(q_len, q_mult), _round_up(kv_len, kv_mult)
  s = _Static(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, q_len=q_len,
              kv_len=kv_len, q_pad=q_pad, kv_pad=kv_pad, causal=bool(causal),
              window=None if sliding_window is None else int(sliding_window),
              has_seg=segment_ids is not None,
              scale=float(head_dim ** -0.5 if scale is None else scale), cfg=cfg,
              interpret=interpret_mode() if interpret is None else bool(interpret))
  if q_pad != q_len:
    q = jnp.pad(q, ((0, 0), (0, q_pad - q_len), (0, 0), (0, 0)))
  if kv_pad != kv_len:
    k = jnp.pad(k, ((0, 0), (0, kv_pad - kv_len), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, kv_pad - kv_len), (0, 0), (0, 0)))
  seg = None
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
  out = _flash(q, k, v, seg, s)
  return out[:, :q_len] if q_pad != q_len else out


def _supports(*, q, k, v, causal, sliding_window, segment_ids, scale) -> str | None:
  del k, v, causal, sliding_window, segment_ids, scale
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
    return f"head_dim {q.shape[-1]} (q {tuple(q.shape)}) is not one of {SUPPORTED_HEAD_DIMS}"
  return None


def _pallas_impl(q, k, v, *, causal, sliding_window, segment_ids, scale):
  return flash_attention(q, k, v, causal=causal, sliding_window=sliding_window,
                         segment_ids=segment_ids, scale=scale)


attn_op.REGISTRY.register(reg.Impl("pallas", _pallas_impl, _supports, auto_priority={"gpu": 20}))
