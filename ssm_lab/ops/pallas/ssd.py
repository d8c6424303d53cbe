"""Pallas GPU (Triton backend) kernels for Mamba-2's SSD, forward and backward through a custom VJP.

Registers `impl="pallas"` with `ssm_lab.ops.ssd.REGISTRY`. Derivation: Dao & Gu 2024 ("Transformers are
SSMs"), sections 6-7; the kernels and the gradient algebra below are this project's own.

Layout of the work. One program owns one (batch, head, segment) and walks the segment's chunks of Q
tokens in order, carrying the head's [head_dim, d_state] state in float32 registers. Per chunk it
does the SSD block products on tensor cores (operands in the input dtype, bf16 in training,
float32 accumulation):

  y   = (L o C B^T) u + exp(acum) * C S^T + D x          u = dt * x,  acum = in-chunk cumsum(dt A)
  S  <- exp(acum_Q) S + (exp(acum_Q - acum) * u)^T B

so the plain forward writes no per-chunk state. When batch * heads is too small to fill the GPU (long
sequences), the sequence is cut into `segments`; the state each segment starts from is computed
first with one XLA matrix product per segment plus a short sequential hand-over, then every segment
runs in parallel. Where splitting each program's head_dim rows in two already fills the GPU, that
split is used instead and nothing is cut (`choose_layout`).

Backward (dy, dS_final given). Under the VJP the forward also saves the state each chunk starts from
([b, h, chunks, P, N] in the input dtype). Given dS, the gradient reaching a chunk's end state, every
gradient of the chunk follows from the chunk's own inputs (below). The backward gets dS in two
kernels: a dS pass, one program per (batch, head, segment, block of head_dim rows), walks the chunks
backwards and stores every chunk's dS_end (bfloat16 for bfloat16 inputs, else float32; its product
(exp(acum) dy)^T C does not depend on the carry, only the elementwise update does); then one program
per (batch, head, chunk), all independent, computes the chunk's gradients. The per-chunk algebra,
with dS updated as the last line:

  du = (L o C B^T)^T dy + exp(acum_Q - acum) * B dS^T          (dx = dt du + D dy, ddt += x.du)
  dB = (L o dy u^T)^T C + exp(acum_Q - acum) * u dS
  dC = (L o dy u^T) B   + exp(acum) * dy S0
  dS <- exp(acum_Q) dS + (exp(acum) * dy)^T C

and the gradient of the log-decays a_t = dt_t A without any sum longer than a chunk:

  d a_s = sum_{t >= s} (C_t.dC_t - B_t.dB_t) + <dS_end, S_end>       (t, s in the chunk)

(from <dS_t, exp(a_t) S_{t-1}> = <dS_t, S_t> - B_t.dB_t and <dS_t, S_t> = C_t.dC_t + <dS_{t+1},
exp(a_{t+1}) S_t>). Summed over the whole sequence instead, these large, cancelling per-token terms
carried their bf16 rounding into dA (15% error at 2k tokens); the kernel comment says how the in-chunk
terms keep float32 accuracy. dB and dC leave per head and are summed over each group's heads in XLA.

One path, no algorithm switches: the alternatives measured against it (a sequential backward
carrying dS in one program per segment, a chunk-parallel forward, the backward chunk kernel split in
two, dB/dC summed over a group by float32 atomics, float32 dS_end for bf16 inputs) lost or gained
nothing reliable; benchmarks/NOTES_ssd.md says where, and the tag `kernel-lab-history` keeps their code.

Shapes inside: head_dim and d_state are zero-padded to powers of two >= 16 (Triton tiles), the length
to a multiple of Q * segments with dt = 0 tokens, which leave the state untouched.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ssm_lab.ops import registry as reg
# Names, not the module: the package attribute `ssm_lab.ops.ssd` is the function.
from ssm_lab.ops.ssd import DEFAULT_CHUNK, REGISTRY, process_dt
from ssm_lab.ops.pallas import interpret_mode

f32 = jnp.float32
# Programs wanted in flight before the sequence is cut into segments (an H100 has 132 SMs and fits
# about two of these programs per SM).
MIN_PROGRAMS = 264
MIN_CHUNKS_PER_SEGMENT = 8


class Config(NamedTuple):
  """Static kernel parameters (hashable: the custom VJP keys on them)."""
  chunk: int
  segments: int                 # the sequence cut of both passes (and of the segment hand-over)
  rep: int                      # heads per B/C group
  num_warps_fwd: int = 4
  num_stages_fwd: int = 3       # measured best of 2/3 on the H100 (notes)
  interpret: bool = False
  ds_block: int = 16            # head_dim rows per dS-pass program
  num_warps_ds: int = 4
  num_stages_ds: int = 3
  num_warps_chunk: int = 4      # the per-chunk backward kernel (many live [Q, N] float32 tiles;
                                # 4 warps spill but fit two programs an SM: 0.71-0.98 of 8 warps'
                                # fwd+bwd time on the H200; NOTES_ssd.md)
  fwd_block: int = 0            # forward: head_dim rows per program (0: all)


def _ds_dtype(dtype) -> jnp.dtype:
  """How dS_end is stored between the backward's two passes: bfloat16 for bfloat16 inputs (half the
  round trip; with 4-warp chunk programs 0.60-0.68 of the float32 / 8-warp default's fwd+bwd time on
  the H200, benchmarks/NOTES_ssd.md; dA error vs the float32 chunked op 9.3e-4 .. 1.6e-3 against
  7.9e-4 .. 1.0e-3 with float32 dS, every other gradient unchanged), float32 otherwise."""
  return jnp.dtype(jnp.bfloat16) if dtype == jnp.bfloat16 else jnp.dtype(f32)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def choose_segments(batch: int, heads: int, n_chunks: int, min_programs: int = MIN_PROGRAMS) -> int:
  """Smallest power of two K with batch * heads * K >= min_programs, keeping >= 8 chunks a segment."""
  k = 1
  while batch * heads * k < min_programs and n_chunks // (2 * k) >= MIN_CHUNKS_PER_SEGMENT:
    k *= 2
  return k


# The sequential forward's head_dim split that choose_layout may pick instead of a segment cut.
SPLIT_FWD_BLOCK = 32


def choose_layout(batch: int, heads: int, n_chunks: int, head_dim: int,
                  min_programs: int | None = None) -> tuple[int, int]:
  """(segments, fwd_block) for the default call.

  When splitting the sequential forward over head_dim (SPLIT_FWD_BLOCK rows a program) alone brings
  batch * heads * blocks to `min_programs`, no sequence cut is needed in either pass, so the segment
  hand-over (its XLA products, slices, pads and converts) goes away. On the H200 at (8, 2048, 24
  heads, 64, 128) that is 0.920 of the segment-cut default's fwd+bwd time synchronised and 0.956
  pipelined (benchmarks/NOTES_ssd.md); at the longer shapes the split does not reach
  `min_programs` and the cut stays. Otherwise `choose_segments` decides both cuts and each program
  takes all head_dim rows (fwd_block 0). `min_programs` None reads MIN_PROGRAMS at call time.
  """
  min_programs = MIN_PROGRAMS if min_programs is None else min_programs
  if batch * heads < min_programs and head_dim >= 2 * SPLIT_FWD_BLOCK and \
     batch * heads * (head_dim // SPLIT_FWD_BLOCK) >= min_programs:
    return 1, SPLIT_FWD_BLOCK
  return choose_segments(batch, heads, n_chunks, min_programs), 0


def _dot(a, b, contract, prec):
  """2-D matrix product contracting a's axis contract[0] with b's axis contract[1], f32 result."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             precision=prec, preferred_element_type=f32)


def _masks(q):
  rows = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
  return rows >= cols, jax.lax.broadcasted_iota(jnp.int32, (q,), 0) == q - 1


def _chunk_decays(ac, causal, is_last):
  """ac [Q] in-chunk inclusive cumsum of dt*A -> (L [Q, Q], acum_Q scalar)."""
  seg = ac[:, None] - ac[None, :]
  # -inf above the diagonal: exp of a positive difference there could overflow before masking.
  decay = jnp.exp(jnp.where(causal, seg, -jnp.inf))
  last = jnp.sum(jnp.where(is_last, ac, 0.0))
  return decay, last


# ----------------------------------------------------------------------------------------- kernels

ALL = slice(None)  # every column of a ref (the default `cols` of _chunk_out)

def _chunk_out(x_ref, dt_ref, ac_ref, b_ref, c_ref, y_ref, s, *, bi, hi, gi, t0, d_h, masks,
               q, prec, cols=ALL):
  """Writes one chunk's y given s [P, N], the state it starts from; returns (u, acum, acum_Q, B).
  The caller computes gi, t0 and the masks (the sequential forward: once, outside its loop). `cols`:
  the head_dim rows this program owns (s is then their [Pb, N] block)."""
  cd = x_ref.dtype
  causal, is_last = masks
  xs = x_ref[bi, pl.ds(t0, q), hi, cols]                        # [Q, P]
  dts = dt_ref[bi, hi, pl.ds(t0, q)]                            # [Q]
  ac = ac_ref[bi, hi, pl.ds(t0, q)]                             # [Q]
  bs = b_ref[bi, pl.ds(t0, q), gi, :]                           # [Q, N]
  cs = c_ref[bi, pl.ds(t0, q), gi, :]
  decay, last = _chunk_decays(ac, causal, is_last)
  u = xs.astype(f32) * dts[:, None]
  cb = _dot(cs, bs, (1, 1), prec)                               # [Q, Q]
  y = _dot((cb * decay).astype(cd), u.astype(cd), (1, 0), prec)
  y = y + jnp.exp(ac)[:, None] * _dot(cs, s.astype(cd), (1, 1), prec)
  y = y + d_h * xs.astype(f32)
  y_ref[bi, pl.ds(t0, q), hi, cols] = y.astype(y_ref.dtype)
  return u, ac, last, bs


def _fwd_kernel(x_ref, dt_ref, ac_ref, b_ref, c_ref, d_ref, s0_ref, y_ref, s_ref, *st_ref, q, cps,
                rep, prec, pb, n_pb):
  # st_ref (only under the VJP): [b, h, chunks, P, N] the state each chunk starts
  # from, for the backward. One program per (batch, head, segment, block of pb head_dim rows): the
  # rows of the state are independent, only C B^T is computed by every block.
  # Statement order as in v3 (the same Triton IR for the same registers).
  bi, hi, kp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ki = kp // n_pb
  cols = pl.ds(pl.multiple_of((kp % n_pb) * pb, pb), pb) if n_pb > 1 else slice(None)
  gi = hi // rep
  cd = x_ref.dtype
  d_h = d_ref[hi]
  masks = _masks(q)

  def body(c, s):
    t0 = pl.multiple_of((ki * cps + c) * q, q)
    if st_ref:
      st_ref[0][bi, hi, ki * cps + c, cols] = s.astype(st_ref[0].dtype)
    u, ac, last, bs = _chunk_out(x_ref, dt_ref, ac_ref, b_ref, c_ref, y_ref, s, bi=bi, hi=hi, gi=gi,
                                 t0=t0, d_h=d_h, masks=masks, q=q, prec=prec, cols=cols)
    uw = (u * jnp.exp(last - ac)[:, None]).astype(cd)
    return jnp.exp(last) * s + _dot(uw, bs, (0, 0), prec)      # [P, N]

  s = jax.lax.fori_loop(0, cps, body, s0_ref[bi, hi, ki, cols])
  s_ref[bi, hi, ki, cols] = s


def _chunk_grads(x_ref, dt_ref, ac_ref, b_ref, c_ref, dy_ref, st_ref, *, dx_refs, bc_refs, bi, hi,
                 chunk, ds, d_h, q, rep, prec):
  """Gradients of one chunk given ds [P, N], the gradient reaching the chunk's end state (float32, or
  the compute dtype when dS_end was stored in it: then it has no low half to add back).

  dx_refs = (dx, ddt, x.dy) and bc_refs = (dB, dC, dA), dB/dC per head (summed over each group's
  heads in XLA afterwards)."""
  gi = hi // rep
  cd = x_ref.dtype
  causal, is_last = _masks(q)
  t0 = pl.multiple_of(chunk * q, q)
  xs = x_ref[bi, pl.ds(t0, q), hi, :]
  dts = dt_ref[bi, hi, pl.ds(t0, q)]
  ac = ac_ref[bi, hi, pl.ds(t0, q)]
  bs = b_ref[bi, pl.ds(t0, q), gi, :]
  cs = c_ref[bi, pl.ds(t0, q), gi, :]
  dy_raw = dy_ref[bi, pl.ds(t0, q), hi, :]
  dys = dy_raw.astype(cd)
  dy_f = dy_raw.astype(f32)
  decay, last = _chunk_decays(ac, causal, is_last)
  xf = xs.astype(f32)
  u = xf * dts[:, None]
  w_end = jnp.exp(last - ac)[:, None]                           # [Q, 1]
  ds_cd = ds.astype(cd)
  # Products (u = dt x, L the in-chunk decays, S0 the chunk's start state):
  #   dC_t = sum_s L[t,s] (dy_t.u_s) B_s + exp(acum_t) S0^T dy_t
  #   du_s = sum_t L[t,s] (C_t.B_s) dy_t + exp(acum_Q - acum_s) dS B_s      (dx = dt du + D dy)
  #   dB_s = sum_t L[t,s] (dy_t.u_s) C_t + exp(acum_Q - acum_s) dS^T u_s
  # The per-token scales go on a [Q, P] operand (exp(acum) dy, exp(acum_Q - acum) u) and both
  # products of a gradient share one accumulator, so no [Q, N] float32 tile is scaled or added.
  # d a_s = sum_{t>=s in chunk} (C_t.dC_t - B_t.dB_t) + <dS_end, S_end> (module docstring), with
  #   C_t.dC_t = (row sums of W)_t + Y_t,   W = L o (C B^T) o (dy u^T),  Y_t = exp(acum_t) dy_t.(S0 C_t)
  #   B_t.dB_t = (column sums of W)_t + F_t,  F_t = exp(acum_Q - acum_t) u_t.(dS B_t)
  #   <dS_end, S_end> = e^{acum_Q} <dS_end, S0> + sum_t F_t,  <dS_end, S0> = trace(dS S0^T).
  # The F terms cancel down to sum_{t<s} F_t; that is summed directly. Y, F and the trace come from
  # [Q, P] / [P, P] products (bf16 operands, exact products, float32 sums), and W from the float32
  # accumulators, because the sums over tokens in dA amplify any bf16 rounding left in them.
  # Each gradient is stored as soon as it is complete (the kernel is register bound). The statement
  # order matters to the register allocation: the S0 terms before the W products spill less (offline
  # SASS: 96 spill instructions against 136), and the dB/dC half before dx spills 533
  # (benchmarks/NOTES_ssd.md).
  cb = _dot(cs, bs, (1, 1), prec)                               # [t, s]
  dus = _dot(bs, ds_cd, (1, 1), prec)                           # [s, p] dS B_s
  dx_ref, ddt_ref, xdy_ref = dx_refs
  du = _dot((cb * decay).astype(cd), dys, (0, 0), prec) + w_end * dus
  dx_ref[bi, pl.ds(t0, q), hi, :] = (du * dts[:, None] + d_h * dy_f).astype(dx_ref.dtype)
  ddt_ref[bi, hi, pl.ds(t0, q)] = jnp.sum(du * xf, axis=1)
  xdy_ref[bi, hi, pl.ds(t0, q)] = jnp.sum(xf * dy_f, axis=1)
  db_ref, dc_ref, da_ref = bc_refs
  # dS rounded to bf16 is one error shared by every token of the chunk, so it adds up coherently
  # in sum_{t<s} F_t and in the trace: add back the low bf16 half of dS there (two more products).
  ds_lo = (ds - ds_cd.astype(f32)).astype(cd) if cd != f32 and ds.dtype == f32 else None
  f_dot = dus if ds_lo is None else dus + _dot(bs, ds_lo, (1, 1), prec)
  f_t = w_end[:, 0] * jnp.sum(u * f_dot, axis=1)
  s0 = st_ref[bi, hi, chunk]                                  # [P, N] state the chunk starts from
  ea = jnp.exp(ac)[:, None]
  p_ = dus.shape[1]
  eye = (jax.lax.broadcasted_iota(jnp.int32, (p_, p_), 0)
         == jax.lax.broadcasted_iota(jnp.int32, (p_, p_), 1))
  ss0 = _dot(ds_cd, s0, (1, 1), prec)                         # [P, P] dS S0^T
  if ds_lo is not None:
    ss0 = ss0 + _dot(ds_lo, s0, (1, 1), prec)
  s0_term = jnp.exp(last) * jnp.sum(jnp.where(eye, ss0, 0.0))
  y_t = ea[:, 0] * jnp.sum(dy_f * _dot(cs, s0, (1, 1), prec), axis=1)
  dyu = _dot(dys, u.astype(cd), (1, 1), prec) * decay         # [t, s] L o (dy u^T)
  w = cb * dyu
  g = jnp.sum(w, axis=1) - jnp.sum(w, axis=0) + y_t
  m2 = dyu.astype(cd)
  dc = _dot(m2, bs, (1, 0), prec) + _dot((dy_f * ea).astype(cd), s0, (1, 0), prec)
  dc_ref[bi, pl.ds(t0, q), hi, :] = dc.astype(dc_ref.dtype)
  db = _dot(m2, cs, (0, 0), prec) + _dot((u * w_end).astype(cd), ds_cd, (1, 0), prec)
  db_ref[bi, pl.ds(t0, q), hi, :] = db.astype(db_ref.dtype)
  # d a_s = sum_{t>=s} g_t + sum_{t<s} F_t + s0_term, from one in-chunk cumsum (Triton has only the
  # forward scan).
  da_ref[bi, hi, pl.ds(t0, q)] = (jnp.sum(g) + s0_term + g - f_t - jnp.cumsum(g - f_t))


def _ds_kernel(dy_ref, ac_ref, c_ref, ds_end_ref, dse_ref, ds0_ref, *, q, cps, rep, prec, pb, n_pb):
  # Backward pass 1: one program per (batch, head, segment, head_dim block) walks the chunks
  # backwards and writes dS_end, the gradient reaching each chunk's end state. The product of a chunk
  # does not depend on the carry (only the elementwise update does), so loads and products of chunk
  # c-1 can overlap the update of chunk c.
  bi, hi, kp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ki, p0 = kp // n_pb, pl.multiple_of((kp % n_pb) * pb, pb)
  gi = hi // rep
  cd = c_ref.dtype
  _, is_last = _masks(q)

  def body(c, ds):
    chunk = ki * cps + cps - 1 - c
    t0 = pl.multiple_of(chunk * q, q)
    dse_ref[bi, hi, chunk, pl.ds(p0, pb), :] = ds.astype(dse_ref.dtype)
    ac = ac_ref[bi, hi, pl.ds(t0, q)]
    dy = dy_ref[bi, pl.ds(t0, q), hi, pl.ds(p0, pb)]            # [Q, Pb]
    cs = c_ref[bi, pl.ds(t0, q), gi, :]                         # [Q, N]
    last = jnp.sum(jnp.where(is_last, ac, 0.0))
    dyw = (dy.astype(f32) * jnp.exp(ac)[:, None]).astype(cd)
    return jnp.exp(last) * ds + _dot(dyw, cs, (0, 0), prec)     # [Pb, N]

  ds0_ref[bi, hi, ki, pl.ds(p0, pb), :] = jax.lax.fori_loop(
      0, cps, body, ds_end_ref[bi, hi, ki, pl.ds(p0, pb), :])


def _bwd_chunk_kernel(x_ref, dt_ref, ac_ref, b_ref, c_ref, dy_ref, d_ref, st_ref, dse_ref, dx_ref,
                      db_ref, dc_ref, da_ref, ddt_ref, xdy_ref, *, q, rep, prec):
  # Backward pass 2: one program per (batch, head, chunk), all independent.
  bi, hi, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  _chunk_grads(x_ref, dt_ref, ac_ref, b_ref, c_ref, dy_ref, st_ref, dx_refs=(dx_ref, ddt_ref, xdy_ref),
               bc_refs=(db_ref, dc_ref, da_ref), bi=bi, hi=hi, chunk=chunk, ds=dse_ref[bi, hi, chunk],
               d_h=d_ref[hi], q=q, rep=rep, prec=prec)


# ------------------------------------------------------------------------------ pallas_call wrappers

def _prec(dtype):
  # float32 inputs: true float32 products (Triton's default for f32 dots is tf32).
  return jax.lax.Precision.HIGHEST if dtype == f32 else None


def _call(kernel, cfg, num_warps, num_stages, grid, out_shape, *args, aliases=None):
  # Named after the kernel function ("ssd_ds_kernel", ...): profiles and jaxprs show which is which.
  name = "ssd" + getattr(kernel, "func", kernel).__name__
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=cfg.interpret, name=name,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      input_output_aliases=aliases or {},
  )(*args)


def _common(x, dt, A, cfg):
  """dtT, acT [b, h, Lp]: dt and the in-chunk inclusive cumsum of dt*A, time contiguous per head."""
  b, lp, h, _ = x.shape
  a = dt * A[None, None, :]
  ac = jnp.cumsum(a.reshape(b, lp // cfg.chunk, cfg.chunk, h), axis=2).reshape(b, lp, h)
  return a, jnp.swapaxes(dt, 1, 2), jnp.swapaxes(ac, 1, 2)


def _segment_decays(ac_t, cfg, k):
  """exp(sum of a over each segment) [b, K, h] from the in-chunk cumsums' chunk ends. (Summing a
  [b, Lp, h] over the token axis directly made XLA emit a 16-block column reduction: 57 us at
  (8, 2048, 24 heads) on the H200 by Nsight Compute; benchmarks/NOTES_ssd.md.)"""
  b, h, lp = ac_t.shape
  ends = ac_t[:, :, cfg.chunk - 1::cfg.chunk].reshape(b, h, k, -1)
  return jnp.exp(jnp.swapaxes(ends.sum(-1), 1, 2))


def _segment_starts(x, dt, a, ac_t, B, s0, cfg):
  """The state each segment starts from: [b, h, K, P, N] float32 (one XLA product per segment)."""
  k = cfg.segments
  b, lp, h, p = x.shape
  g, n = B.shape[2:]
  if k == 1:
    return s0[:, :, None]
  ls = lp // k
  # Only segments 0 .. K-2 hand a state over: the last segment's own contribution is not needed.
  a_s = a.reshape(b, k, ls, h)[:, :-1]
  after = jnp.flip(jnp.cumsum(jnp.flip(a_s, 2), 2), 2) - a_s    # sum of a over later tokens
  w = (jnp.exp(after) * dt.reshape(b, k, ls, h)[:, :-1]).reshape(b, k - 1, ls, g, cfg.rep)
  uw = (x.reshape(b, k, ls, g, cfg.rep, p)[:, :-1].astype(f32) * w[..., None]).astype(x.dtype)
  local = jnp.einsum("bksgrp,bksgn->bkgrpn", uw,
                     B.reshape(b, k, ls, g, n)[:, :-1].astype(x.dtype), preferred_element_type=f32,
                     precision=_prec(x.dtype)).reshape(b, k - 1, h, p, n)
  total = _segment_decays(ac_t, cfg, k)                          # [b, k, h]
  starts, s = [s0], s0
  for j in range(k - 1):
    s = total[:, j, :, None, None] * s + local[:, j]
    starts.append(s)
  return jnp.stack(starts, axis=2)


def _segment_grad_ends(dy, a, ac_t, C, ds_final, cfg):
  """Gradient reaching each segment's end state from later tokens: [b, h, K, P, N] float32."""
  k = cfg.segments
  b, lp, h, p = dy.shape
  g, n = C.shape[2:]
  if k == 1:
    return ds_final[:, :, None]
  ls = lp // k
  # Only segments 1 .. K-1 hand a gradient back: segment 0's own contribution is not needed.
  a_s = a.reshape(b, k, ls, h)[:, 1:]
  w = jnp.exp(jnp.cumsum(a_s, 2)).reshape(b, k - 1, ls, g, cfg.rep)
  dyw = (dy.reshape(b, k, ls, g, cfg.rep, p)[:, 1:].astype(f32) * w[..., None]).astype(C.dtype)
  local = jnp.einsum("bktgrp,bktgn->bkgrpn", dyw, C.reshape(b, k, ls, g, n)[:, 1:],
                     preferred_element_type=f32, precision=_prec(C.dtype)).reshape(b, k - 1, h, p, n)
  total = _segment_decays(ac_t, cfg, k)
  ends, d = [None] * k, ds_final
  for j in reversed(range(k)):
    ends[j] = d
    if j:                                                       # grad of segment j-1's end state
      d = total[:, j, :, None, None] * d + local[:, j - 1]
  return jnp.stack(ends, axis=2)


def _forward(x, dt, A, B, C, D, s0, cfg, save_states):
  b, lp, h, p = x.shape
  n = B.shape[-1]
  k = cfg.segments
  cps = lp // (cfg.chunk * k)
  a, dt_t, ac_t = _common(x, dt, A, cfg)
  s_seg = _segment_starts(x, dt, a, ac_t, B, s0, cfg)
  prec = _prec(x.dtype)
  pb = min(cfg.fwd_block or p, p)
  kern = functools.partial(_fwd_kernel, q=cfg.chunk, cps=cps, rep=cfg.rep, prec=prec, pb=pb,
                           n_pb=p // pb)
  outs = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, k, p, n), f32)]
  if save_states:
    outs.append(jax.ShapeDtypeStruct((b, h, k * cps, p, n), x.dtype))
  res = _call(kern, cfg, cfg.num_warps_fwd, cfg.num_stages_fwd, (b, h, k * (p // pb)), tuple(outs),
              x, dt_t, ac_t, B, C, D, s_seg)
  return res[0], res[1][:, :, -1], (res[2] if save_states else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(x, dt, A, B, C, D, s0, cfg):
  y, s_final, _ = _forward(x, dt, A, B, C, D, s0, cfg, save_states=False)
  return y, s_final


def _core_fwd(x, dt, A, B, C, D, s0, cfg):
  y, s_final, states = _forward(x, dt, A, B, C, D, s0, cfg, save_states=True)
  return (y, s_final), (x, dt, A, B, C, D, states)


def _core_bwd(cfg, res, cts):
  x, dt, A, B, C, D, states = res
  dy, ds_final = cts
  b, lp, h, p = x.shape
  g, n = B.shape[2:]
  k = cfg.segments
  cps = lp // (cfg.chunk * k)
  a, dt_t, ac_t = _common(x, dt, A, cfg)
  dy = dy.astype(x.dtype)
  ds_end = _segment_grad_ends(dy, a, ac_t, C, ds_final.astype(f32), cfg)
  # Per-head dB/dC: float32 when nothing is summed afterwards, else the compute dtype (the f32 sum over
  # a group's heads then rounds once, and the round trip moves half the bytes).
  part = f32 if (cfg.rep == 1 or x.dtype == f32) else x.dtype
  vec = jax.ShapeDtypeStruct((b, h, lp), f32)
  grads = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, lp, h, n), part),
           jax.ShapeDtypeStruct((b, lp, h, n), part), vec, vec, vec)
  ds_seg = jax.ShapeDtypeStruct((b, h, k, p, n), f32)
  prec = _prec(x.dtype)
  pb = min(cfg.ds_block, p)
  n_pb = p // pb
  kern = functools.partial(_ds_kernel, q=cfg.chunk, cps=cps, rep=cfg.rep, prec=prec, pb=pb,
                           n_pb=n_pb)
  ds_chunks, ds_start = _call(
      kern, cfg, cfg.num_warps_ds, cfg.num_stages_ds, (b, h, k * n_pb),
      (jax.ShapeDtypeStruct((b, h, k * cps, p, n), _ds_dtype(x.dtype)), ds_seg),
      dy, ac_t, C, ds_end)
  kern = functools.partial(_bwd_chunk_kernel, q=cfg.chunk, rep=cfg.rep, prec=prec)
  dx, db_h, dc_h, da, ddt_u, xdy = _call(kern, cfg, cfg.num_warps_chunk, 1, (b, h, k * cps), grads,
                                         x, dt_t, ac_t, B, C, dy, D, states, ds_chunks)
  ddt = jnp.swapaxes(ddt_u + da * A[None, :, None], 1, 2)          # [b, lp, h]
  dA = jnp.sum(da * dt_t, axis=(0, 2))
  group_sum = lambda t: t.astype(f32).reshape(b, lp, g, cfg.rep, n).sum(3).astype(B.dtype)
  dD = jnp.sum(xdy, axis=(0, 2))
  return (dx, ddt.astype(dt.dtype), dA.astype(A.dtype), group_sum(db_h), group_sum(dc_h),
          dD.astype(D.dtype), ds_start[:, :, 0])


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------- public entry

def ssd_pallas(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
               D: jax.Array | None = None, dt_bias: jax.Array | None = None,
               dt_softplus: bool = False, chunk_size: int | None = None,
               initial_state: jax.Array | None = None, return_final_state: bool = False,
               segments: int | None = None, fwd_block: int | None = None,
               num_warps_fwd: int = 4, num_stages_fwd: int = 3, ds_block: int = 16,
               num_warps_ds: int = 4, num_stages_ds: int = 3, num_warps_chunk: int = 4,
               interpret: bool | None = None) -> Any:
  """The SSD contract of `ssm_lab.ops.ssd` (validated there) on the Pallas kernels.

  The rest are layout and tiling parameters of the one set of kernels, for benchmarks (the defaults
  are what `impl="pallas"` uses): `segments` and `fwd_block` (the sequence cut of both passes, and
  head_dim rows per forward program, a power of two >= 16; both None: from `choose_layout`; one
  given: the other from `choose_segments` / 0), Triton `num_warps_*` / `num_stages_*` of the forward,
  the dS pass and the chunk kernel, `ds_block` (head_dim rows per dS-pass program, a power of two
  >= 16), `interpret` (None: on when no GPU).
  """
  if ds_block < 16 or ds_block & (ds_block - 1):
    raise ValueError(f"ds_block must be a power of two >= 16, got {ds_block}")
  if fwd_block is not None and (fwd_block < 16 or fwd_block & (fwd_block - 1)):
    raise ValueError(f"fwd_block must be a power of two >= 16, got {fwd_block}")
  batch, length, heads, head_dim = x.shape
  groups, d_state = B.shape[2], B.shape[3]
  q = chunk_size or DEFAULT_CHUNK
  n_chunks = -(-length // q)
  pp, nn = max(16, _next_pow2(head_dim)), max(16, _next_pow2(d_state))
  if segments is None and fwd_block is None:
    k, fwd_block = choose_layout(batch, heads, n_chunks, pp)
  else:
    k = segments or choose_segments(batch, heads, n_chunks)
  lp = -(-n_chunks // k) * k * q
  cfg = Config(chunk=q, segments=k, rep=heads // groups, num_warps_fwd=num_warps_fwd,
               num_stages_fwd=num_stages_fwd, ds_block=ds_block, num_warps_ds=num_warps_ds,
               num_stages_ds=num_stages_ds, num_warps_chunk=num_warps_chunk,
               fwd_block=fwd_block or 0,
               interpret=interpret_mode() if interpret is None else interpret)

  # Matrix products run in x's dtype; B and C are cast once here, not per program.
  cd = x.dtype
  dt = process_dt(dt, dt_bias, dt_softplus)
  pad_l = lp - length
  xp = jnp.pad(x, ((0, 0), (0, pad_l), (0, 0), (0, pp - head_dim)))
  dtp = jnp.pad(dt, ((0, 0), (0, pad_l), (0, 0)))
  Bp = jnp.pad(B.astype(cd), ((0, 0), (0, pad_l), (0, 0), (0, nn - d_state)))
  Cp = jnp.pad(C.astype(cd), ((0, 0), (0, pad_l), (0, 0), (0, nn - d_state)))
  Dp = jnp.zeros((heads,), f32) if D is None else D.astype(f32)
  s0 = (jnp.zeros((batch, heads, pp, nn), f32) if initial_state is None else
        jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, pp - head_dim), (0, nn - d_state))))
  y, s_final = _core(xp, dtp, A.astype(f32), Bp, Cp, Dp, s0, cfg)
  y = y[:, :length, :, :head_dim]
  if return_final_state:
    return y, s_final[:, :, :head_dim, :d_state]
  return y


def _pallas(x, dt, A, B, C, *, D, dt_bias, dt_softplus, chunk_size, initial_state,
            return_final_state):
  return ssd_pallas(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                    chunk_size=chunk_size, initial_state=initial_state,
                    return_final_state=return_final_state)


def _supports(*, x, B, chunk_size, **_: Any) -> str | None:
  q = chunk_size or DEFAULT_CHUNK
  if q < 16 or q > 128 or q & (q - 1):
    return f"chunk_size must be a power of two in [16, 128] for the Triton tiles, got {q}"
  if x.shape[-1] > 128 or B.shape[-1] > 256:
    return (f"head_dim <= 128 and d_state <= 256 (the state lives in registers), got head_dim="
            f"{x.shape[-1]}, d_state={B.shape[-1]}")
  return None


REGISTRY.register(reg.Impl("pallas", _pallas, _supports, auto_priority={"gpu": 20}))
