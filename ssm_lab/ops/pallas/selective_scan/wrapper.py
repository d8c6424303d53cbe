"""The selective scan's entry: padding to the kernels' canonical layout, the pallas_calls, the
two-pass segment hand-over and the custom VJP (forward saves chunk checkpoints; backward recomputes).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ssm_lab.ops.pallas import interpret_mode
from ssm_lab.ops.pallas.scan_primitive import linear_recurrence
from ssm_lab.ops.pallas.selective_scan.common import F32, Config, _padded_d_state, _Static, default_config
from ssm_lab.ops.pallas.selective_scan.v4 import _bwd4_kernel, _fwd4_kernel
from ssm_lab.ops.pallas.selective_scan.v6 import _adjoint6_kernel, _bwd6_kernel, _fwd6_kernel

# --------------------------------------------------------------------------------------------------
# pallas_call wrappers. Grid (channel block j, segment p, batch b).


def _v6(st: _Static) -> bool:
  return st.cfg.kernels == "v6"


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
  return pl.pallas_call(
      functools.partial(_fwd6_kernel if _v6(st) else _fwd4_kernel, st=st, mode="fwd"),
      out_shape=out_shape,
      grid=(dp // bd, P, b), in_specs=in_specs, out_specs=out_specs,
      compiler_params=_params(st, st.cfg.num_warps), interpret=st.interpret,
      name="selective_scan_fwd")(*args)


def _state_call(st: _Static, u, dl, bm, a, bias):
  bd = st.cfg.block_d
  b, dp, n, P = st.batch, st.d_pad, st.n_pad, st.cfg.segments
  tok, grp, chan, tile, seg_tile, seg_chan = _specs(st, bd)
  return pl.pallas_call(
      functools.partial(_fwd6_kernel if _v6(st) else _fwd4_kernel, st=st, mode="state"),
      out_shape=[jax.ShapeDtypeStruct((b, P - 1, n, dp), F32),
                 jax.ShapeDtypeStruct((b, P - 1, dp), F32)],
      grid=(dp // bd, P - 1, b), in_specs=[tok, tok, grp, tile, chan],
      out_specs=[seg_tile, seg_chan], compiler_params=_params(st, st.cfg.num_warps),
      interpret=st.interpret, name="selective_scan_state")(u, dl, bm, a, bias)


def _adjoint_call(st: _Static, dl, z, cm, a, bias, dy):
  bd = st.cfg.block_d
  b, dp, n, P = st.batch, st.d_pad, st.n_pad, st.cfg.segments
  tok, grp, chan, tile, _, _ = _specs(st, bd, seg_offset=1)
  seg_tile = pl.BlockSpec((None, None, n, bd), lambda j, p, b: (b, p, 0, j))
  seg_chan = pl.BlockSpec((None, None, bd), lambda j, p, b: (b, p, j))
  in_specs = [tok] + ([tok] if st.has_z else []) + [grp, tile, chan, tok]
  args = [dl] + ([z] if st.has_z else []) + [cm, a, bias, dy]
  return pl.pallas_call(
      (functools.partial(_adjoint6_kernel, st=st) if _v6(st)
       else functools.partial(_bwd4_kernel, st=st, mode="adjoint")),
      out_shape=[jax.ShapeDtypeStruct((b, P - 1, n, dp), F32),
                 jax.ShapeDtypeStruct((b, P - 1, dp), F32)],
      grid=(dp // bd, P - 1, b), in_specs=in_specs, out_specs=[seg_tile, seg_chan],
      compiler_params=_params(st, st.cfg.num_warps), interpret=st.interpret,
      name="selective_scan_adjoint")(*args)


def _bwd_call(st: _Static, u, dl, z, bcs, a, d_skip, bias, ck, dy, gend):
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
      (functools.partial(_bwd6_kernel, st=st) if _v6(st)
       else functools.partial(_bwd4_kernel, st=st, mode="bwd")), out_shape=out_shape,
      grid=(nblk, P, b),
      in_specs=in_specs, out_specs=out_specs, compiler_params=_params(st, st.cfg.bwd_num_warps),
      interpret=st.interpret, name="selective_scan_bwd")(*args)


# --------------------------------------------------------------------------------------------------
# custom_vjp over the padded canonical arrays:
#   u, dl, z [b, Lp, Dp]; bm, cm [b, Lp, G, Np]; a [Np, Dp] f32; d_skip, bias [Dp] f32; h0 [b, Np, Dp] f32.


def _bcs(st: _Static, bm, cm):
  """The B/C arrays the kernels read."""
  del st
  return [bm, cm]


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
  bcs = _bcs(st, bm, cm)
  h0seg = _segment_starts(st, u, dl, bcs, a, bias, h0)
  return _fwd_call(st, u, dl, z, bcs, a, d_skip, bias, h0seg, save_ck)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st: _Static, u, dl, z, bm, cm, a, d_skip, bias, h0):
  y, hend = _forward(st, u, dl, z, bm, cm, a, d_skip, bias, h0, save_ck=False)
  return y, hend[:, -1]


def _scan_fwd(st: _Static, u, dl, z, bm, cm, a, d_skip, bias, h0):
  y, hend, ck = _forward(st, u, dl, z, bm, cm, a, d_skip, bias, h0, save_ck=True)
  return (y, hend[:, -1]), (u, dl, z, bm, cm, a, d_skip, bias, ck, h0)


def _scan_bwd(st: _Static, res, cts):
  u, dl, z, bm, cm, a, d_skip, bias, ck, h0 = res
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
  outs = _bwd_call(st, u, dl, z, bcs, a, d_skip, bias, ck, dy, gend)
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
  step = cfg.chunk * cfg.segments
  padded_length = -(-length // step) * step
  st = _Static(batch=batch, length=length, padded_length=padded_length,
               d_pad=groups * d_group_pad, d_group_pad=d_group_pad, n_pad=n_pad, n_groups=groups,
               has_z=z is not None, softplus=bool(delta_softplus),
               cfg=cfg,
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




def padded_sizes(batch: int, length: int, d_inner: int, d_state: int, n_groups: int = 1,
                 config: Config | None = None) -> dict[str, Any]:
  """The padded problem the kernels see (for benchmarks' byte counts and tests)."""
  cfg = default_config(batch, length, d_inner, d_state, n_groups, config)
  block_max = max(cfg.block_d, cfg.bwd_block_d)
  d_group_pad = -(-(d_inner // n_groups) // block_max) * block_max
  step = cfg.chunk * cfg.segments
  return dict(config=cfg, padded_length=-(-length // step) * step, d_pad=n_groups * d_group_pad,
              n_pad=_padded_d_state(d_state), checkpoints=-(-length // step) * step // cfg.chunk)
