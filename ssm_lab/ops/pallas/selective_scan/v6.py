"""The v6 kernels (the default for a padded d_state <= 16): token by token on register tiles.

`_fwd6_kernel` (modes "fwd" and "state"), `_adjoint6_kernel` (the segment adjoint pass) and
`_bwd6_kernel` take the refs of the v4 kernels (`v4.py`). The state, adjoint and dA are
[d_state, block_d] float32 tiles read with plain slices (channels contiguous, last axis); a program is
one warp of 32 channels. jaxlib's Triton gives each lane 16-byte vectors: 4 channels x 4 states, 8
lanes over the channels and 4 over the states at d_state 16, so a sum over states takes two shuffle
levels and one over channels three (48 SHFL a token in the backward). The tile shapes were found with
a bare prototype of these kernels (tag kernel-lab-history, benchmarks/scan_prototype.py).

Backward: per chunk of T tokens (the forward's checkpoint interval) the kernel recomputes the state at
every `_V6_SUB` tokens from the checkpoint; per sub-chunk it recomputes and keeps those states and
their decays, then walks them backwards: g_t = a_{t+1} g_{t+1} + dy_t C_t (the carry holds
a_{t+1} g_{t+1}), with w_t = exp(delta_t A) h_{t-1}:
  d delta_t = sum_n g_t (A w_t + u_t B_t),  du_t = D dy_t + delta_t sum_n g_t B_t,
  dA += g_t w_t delta_t,  dB_t = sum_d g_t delta_t u_t,  dC_t = sum_d dy_t h_t,
one exponential per state element and token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ssm_lab.ops.pallas.selective_scan.common import (F32, LOG2E, _ex2, _fma, _load_rows, _refs,
                                                      _sigmoid, _Static, _widen)
from ssm_lab.ops.pallas.selective_scan.v4 import _fwd_refs

# Sub-chunk: offline SASS at (8, 2048, 1536, 16), chunk 8: 32 B of stack at 2, 336 B at 4, with the
# same instruction count.
_V6_SUB = 2


def recompute_sub_chunks(step, h, t0: int, T: int, U: int, before_sub=None):
  """The v6 backward's recompute of one chunk of T tokens from its checkpoint h (the state before
  token t0). `step(h, t) -> (decay a_t, h_t)`. Recomputes the state at every U tokens, then, sub-chunk
  by sub-chunk from the last, calls `before_sub(j)` (if given) and yields (j, states, decays): the
  U + 1 states from before the sub-chunk's first token t0 + j U to after its last, and the U decays."""
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
  """Rows (states) of one state tile in the v6 forward, state pass and backward: 4 (see
  `_fwd6_kernel`)."""
  return min(4, st.n_pad)


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
  """`v4._fwd4_kernel`'s modes ("fwd": y, the end state and optionally the chunk
  checkpoints; "state": the end state from zero and the sum of delta) on the v6 tiles, token by token.

  The state is held as d_state / q tiles of [q, block_d] (`_state_rows`, q = 4): the 4 rows that
  one lane holds at 32 channels a warp (Triton repeats its [4, 32] lane grid down the rows), so y's
  sum over states is an fma chain across the tiles plus the cross-lane sum of one tile, instead of
  a product and an add a state (offline SASS at (8, 2048, 5120, 16): 1632 -> 1528 instructions a
  chunk, the same registers, shuffles and barriers; H100 2026-12-07: fwd+bwd 4% faster than one
  [d_state, block_d] tile at three benchmark shapes, 30% at (1, 65536, 2048, 16);
  results/scan_knobs_ab.md). The backward holds its adjoint and dA the same way.
  """
  r, ck_ref = _fwd_refs(refs, st, mode)
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
    h, dts = carry
    # All of the chunk's loads first, in both modes. "fwd": nothing tells the compiler that the y
    # stores do not alias them, so a load after a store would wait for it. "state" stores nothing,
    # but every token converts its vectors to the tile layout through shared memory, and ptxas does
    # not move a load above the barrier that takes: loaded token by token, each token waited for
    # its own loads (H100 2026-12-05, Nsight Compute; benchmarks/NOTES_selective_scan.md).
    # (Loading the next chunk's inputs a step ahead, through the carry, cost registers and was
    # slower on the H100: tag kernel-lab-history, Config.prefetch.)
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
    return h, dts

  h0 = (tuple(jnp.zeros(x.shape, F32) for x in a2) if mode == "state"
        else _row_blocks(r["h0"], q, nb))
  h, dts = jax.lax.fori_loop(0, n_chunks, chunk, (h0, jnp.zeros(bias.shape, F32)))
  if mode == "state":
    _store_row_blocks(r["hloc"], h, q)
    r["dts"][...] = dts
  else:
    _store_row_blocks(r["hend"], h, q)


def _adjoint6_kernel(*refs, st: _Static):
  """The segment adjoint pass (as `v4._bwd4_kernel` mode "adjoint") on the v6 tiles."""
  r, _ = _refs(refs, st, "dl z c a bias dy gloc dts")
  interp = st.interpret
  T, S = st.cfg.chunk, st.seg_len
  n_chunks = S // T
  t_base = (pl.program_id(1) + 1) * S                       # this grid runs segments 1..P-1
  a2 = r["a"][...] * LOG2E
  bias = r["bias"][...]

  names = ("dl", "dy", "c") + (("z",) if st.has_z else ())

  def load_chunk(k):
    return [_load_rows(r, (n_chunks - 1 - k) * T + i, names) for i in range(T)]

  def chunk(k, carry):
    g, dts = carry
    t0 = (n_chunks - 1 - k) * T
    ins = load_chunk(k)                                     # the chunk's loads first
    for i in reversed(range(T)):
      v = _widen(ins[i], bias, t0 + i, t_base, st)
      dt, dys = v["dt"], v["dy"]
      if st.has_z:
        dys = dys * v["z"] * _sigmoid(v["z"], interp)
      g = _fma(v["c"][:, None], dys[None, :], g, interp)
      g = _ex2(dt[None, :] * a2, interp) * g
      dts = dts + dt
    return g, dts

  g, dts = jax.lax.fori_loop(0, n_chunks, chunk, (jnp.zeros(a2.shape, F32),
                                                  jnp.zeros(bias.shape, F32)))
  r["gloc"][...] = g
  r["dts"][...] = dts


def _bwd6_kernel(*refs, st: _Static):
  """Every gradient of one segment's tokens, chunks in reverse from the adjoint at its end (the refs
  of `v4._bwd4_kernel` mode "bwd")."""
  r, _ = _refs(refs, st, "u dl z b c a d bias ck dy gend du ddl dz dbp dcp da dd dbias dh0")
  interp = st.interpret
  T, S = st.cfg.chunk, st.seg_len
  U = min(_V6_SUB, T)
  n_chunks = S // T
  t_base = pl.program_id(1) * S
  # State, adjoint and dA as nb tiles of q states (`_fwd6_kernel`).
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
  # chunk start, 488 B), and loading only C, dy and z a sub-chunk ahead was slower on the H100 (tag
  # kernel-lab-history, Config.bwd_prefetch).
  recompute_names = ("u", "dl", "b")                       # what the recompute needs
  sub_names = ("c", "dy") + (("z",) if st.has_z else ())    # what the gradients need besides

  # Raw loads keyed by the token's offset in its chunk (the chunk start's), then the current
  # sub-chunk's widened inputs.
  loads, sub_inputs = {}, {}

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
      else:
        rows = _load_rows(r, t0 + o, recompute_names + sub_names, q)
      sub_inputs[o] = _widen(rows, bias, t0 + o, t_base, st)

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
