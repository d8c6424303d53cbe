"""The v4 kernels (the default for a padded d_state above 16): parallel over time inside a chunk.

A program owns `block_d` channels of one batch row and one time segment and walks it `chunk` (T)
tokens at a time. Per chunk it loads [T, block_d] tiles (channels contiguous) and, per group of
`state_block` states, forms the [T, block_d, state_block] decays a = exp(delta A) and inputs
b = delta u B, runs h_t = a_t h_{t-1} + b_t over the T axis as one scan of the pairs (a, b)
(`scan_primitive.linear_recurrence`, Triton's tt.scan), folds the carried state in
(h_t = hloc_t + P_t h_carry, P_t = a_1...a_t) and contracts with C. Triton lays the tiles out with T
inside each thread, so the scans are sequential in registers and the parallelism is over channels
and states.

The backward recomputes the chunk's states the same way from the checkpoint and runs the adjoint
g_t = a_{t+1} g_{t+1} + dy_t C_t as a reverse scan of the pairs (a_{t+1}, dy_t C_t) (the chunk's last
token takes decay 1: the carried adjoint already holds the next token's decay), then
g_t = gloc_t + Q_t G_carry with Q_t = prod_{s>t} a_s inside the chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ssm_lab.ops.pallas.scan_primitive import linear_recurrence
from ssm_lab.ops.pallas.selective_scan.common import F32, LOG2E, _ex2, _refs, _sigmoid, _softplus, _Static

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
  """The refs of a forward-direction kernel: (named refs, chunk-checkpoint ref or None). Mode
  "state" has no checkpoints."""
  if mode == "state":
    r, _ = _refs(refs, st, "u dl b a bias hloc dts")
    return r, None
  r, rest = _refs(refs, st, "u dl z b c a d bias h0 y hend")
  return r, (rest[0] if rest else None)


def _fwd4_kernel(*refs, st: _Static, mode: str):
  """mode "fwd": y and the segment's end state (and the chunk checkpoints when a third output is
  given); mode "state": the end state from a zero start and the sum of delta (segment first pass)."""
  r, ck_ref = _fwd_refs(refs, st, mode)
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
