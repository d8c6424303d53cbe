"""The state-space dual (SSD) layer of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"), behind one
function and `impl=`.

Mamba-2 makes the decay a scalar per head, so the recurrence

  dt  <- dt + dt_bias ; dt <- softplus(dt) if dt_softplus
  S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T          S: [batch, heads, head_dim, d_state]
  y_t  = S_t C_t + D * x_t

equals, inside a chunk of Q tokens, a masked matrix product (the "dual" attention-like form)

  y = (L o C B^T) (dt x)  +  exp(cumsum(a)) * C S_prev^T ,  L[t, s] = exp(a_{s+1} + ... + a_t), s <= t,

with a_t = dt_t * A, plus one state hand-over per chunk. Head h reads the B/C group
h // (heads // n_groups).

Implementations (see `REGISTRY`):
  "reference"  token-by-token `lax.scan` with a float32 state: the oracle the others are tested against.
  "chunked"    the SSD block decomposition in plain JAX/XLA (Dao & Gu 2024, section 6): intra-chunk
               masked matrix products, a `lax.scan` over chunks for the states. Any chunk size works;
               the length is padded with no-op tokens (dt = 0) up to a multiple of it; a sequence
               shorter than the chunk is one chunk of its own length.
  "pallas"     Pallas GPU kernels with a custom VJP (ssm_lab.ops.pallas.ssd), registered there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ssm_lab.ops import registry as reg

REGISTRY = reg.OpRegistry("ssd")

DEFAULT_CHUNK = 64


def process_dt(dt: jax.Array, dt_bias: jax.Array | None, dt_softplus: bool) -> jax.Array:
  """dt [batch, length, heads] -> float32 step sizes after the bias and the optional softplus."""
  dt = dt.astype(jnp.float32)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(jnp.float32)
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  return dt


def expand_groups(B: jax.Array, heads: int) -> jax.Array:
  """[batch, length, n_groups, d_state] -> [batch, length, heads, d_state] (head h reads group
  h // (heads // n_groups))."""
  return jnp.repeat(B, heads // B.shape[2], axis=2)


def _reference(x, dt, A, B, C, *, D, dt_bias, dt_softplus, chunk_size, initial_state,
               return_final_state):
  del chunk_size  # the recurrence has no chunks
  batch, _, heads, head_dim = x.shape
  f32 = jnp.float32
  dt = process_dt(dt, dt_bias, dt_softplus)                          # [b, l, h]
  Bh = expand_groups(B.astype(f32), heads)                           # [b, l, h, n]
  Ch = expand_groups(C.astype(f32), heads)
  xf = x.astype(f32)
  s0 = (jnp.zeros((batch, heads, head_dim, B.shape[-1]), f32) if initial_state is None
        else initial_state.astype(f32))

  def step(s, inputs):
    x_t, dt_t, b_t, c_t = inputs                                       # [b,h,p] [b,h] [b,h,n] [b,h,n]
    decay = jnp.exp(dt_t * A.astype(f32))[..., None, None]
    s = decay * s + (dt_t[..., None] * x_t)[..., None] * b_t[..., None, :]
    return s, jnp.einsum("bhpn,bhn->bhp", s, c_t, precision="highest")

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  s_last, ys = jax.lax.scan(step, s0, (time_major(xf), time_major(dt), time_major(Bh),
                                       time_major(Ch)))
  y = jnp.moveaxis(ys, 0, 1)
  if D is not None:
    y = y + xf * D.astype(f32)[:, None]
  y = y.astype(x.dtype)
  return (y, s_last) if return_final_state else y


def _chunked(x, dt, A, B, C, *, D, dt_bias, dt_softplus, chunk_size, initial_state,
             return_final_state):
  batch, length, heads, head_dim = x.shape
  groups, d_state = B.shape[2], B.shape[3]
  rep = heads // groups
  # A sequence shorter than a chunk is one chunk of its own length: padding it to the chunk would
  # multiply the intra-chunk work by chunk / length for the same result.
  q = min(chunk_size or DEFAULT_CHUNK, length)
  f32 = jnp.float32
  # Matrix products take the inputs' dtype (bf16 on tensor cores) and accumulate in float32.
  cd = x.dtype
  prec = "highest" if cd == jnp.float32 else None
  dt = process_dt(dt, dt_bias, dt_softplus)

  n_chunks = -(-length // q)
  pad = n_chunks * q - length
  if pad:
    # dt = 0 makes a padded token a no-op: decay exp(0) = 1 and input 0, so the state passes
    # through unchanged and the final state stays exact.
    widths = lambda a: [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
    x, dt, B, C = (jnp.pad(a, widths(a)) for a in (x, dt, B, C))

  xc = x.reshape(batch, n_chunks, q, groups, rep, head_dim)
  dtc = dt.reshape(batch, n_chunks, q, groups, rep)
  Bc = B.reshape(batch, n_chunks, q, groups, d_state).astype(cd)
  Cc = C.reshape(batch, n_chunks, q, groups, d_state).astype(cd)
  a_cum = jnp.cumsum(dtc * A.astype(f32).reshape(groups, rep), axis=2)  # [b, c, q, g, r]
  a_cum = jnp.moveaxis(a_cum, 2, -1)                                     # [b, c, g, r, q]
  a_last = a_cum[..., -1]                                                # [b, c, g, r]

  # Intra-chunk: y_t += sum_{s<=t} exp(acum_t - acum_s) (C_t . B_s) dt_s x_s.
  causal = jnp.tril(jnp.ones((q, q), bool))
  seg = a_cum[..., :, None] - a_cum[..., None, :]                        # [b, c, g, r, q, q]
  decay = jnp.exp(jnp.where(causal, seg, -jnp.inf))
  cb = jnp.einsum("bctgn,bcsgn->bcgts", Cc, Bc, preferred_element_type=f32, precision=prec)
  m = (cb[:, :, :, None] * decay).astype(cd)
  u = xc.astype(f32) * dtc[..., None]                                    # [b, c, q, g, r, p]
  y = jnp.einsum("bcgrts,bcsgrp->bctgrp", m, u.astype(cd), preferred_element_type=f32,
                 precision=prec)

  # Each chunk's own contribution to the state at its end.
  w_end = jnp.exp(a_last[..., None] - a_cum)                             # [b, c, g, r, q]
  uw = (u * jnp.moveaxis(w_end, -1, 2)[..., None]).astype(cd)
  s_local = jnp.einsum("bcsgrp,bcsgn->bcgrpn", uw, Bc, preferred_element_type=f32, precision=prec)

  # Inter-chunk: hand the state from chunk to chunk, keeping the state each chunk starts from.
  s0 = (jnp.zeros((batch, heads, head_dim, d_state), f32) if initial_state is None
        else initial_state.astype(f32))
  s0 = s0.reshape(batch, groups, rep, head_dim, d_state)

  def pass_state(s, inputs):
    last, local = inputs
    return jnp.exp(last)[..., None, None] * s + local, s

  s_final, s_start = jax.lax.scan(pass_state, s0, (jnp.moveaxis(a_last, 1, 0),
                                                   jnp.moveaxis(s_local, 1, 0)))
  s_start = jnp.moveaxis(s_start, 0, 1)                                  # [b, c, g, r, p, n]
  y_prev = jnp.einsum("bctgn,bcgrpn->bctgrp", Cc, s_start.astype(cd), preferred_element_type=f32,
                      precision=prec)
  y = y + y_prev * jnp.moveaxis(jnp.exp(a_cum), -1, 2)[..., None]

  y = y.reshape(batch, n_chunks * q, heads, head_dim)[:, :length]
  if D is not None:
    y = y + x[:, :length].astype(f32) * D.astype(f32)[:, None]
  y = y.astype(x.dtype)
  if return_final_state:
    return y, s_final.reshape(batch, heads, head_dim, d_state)
  return y


REGISTRY.register(reg.Impl("reference", _reference, reg.always, auto_priority={}))
REGISTRY.register(reg.Impl("chunked", _chunked, reg.always,
                           auto_priority={"cpu": 10, "gpu": 10, "tpu": 10}))


def validate(x, dt, A, B, C, D, dt_bias, initial_state, chunk_size) -> None:
  """Checks the contract's shapes, dtypes and chunk size; raises ValueError naming the argument."""
  for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
    reg.check_float(name, a)
  reg.check_rank("x", x, 4, "[batch, length, heads, head_dim]")
  batch, length, heads, head_dim = x.shape
  reg.check_shape("dt", dt, (batch, length, heads), "[batch, length, heads]")
  reg.check_shape("A", A, (heads,), "[heads]")
  reg.check_rank("B", B, 4, "[batch, length, n_groups, d_state]")
  if B.shape[:2] != (batch, length):
    raise ValueError(f"B must have shape [batch, length, n_groups, d_state] with batch={batch}, "
                     f"length={length} (from x {tuple(x.shape)}), got {tuple(B.shape)}")
  reg.check_shape("C", C, B.shape, "[batch, length, n_groups, d_state] (the shape of B)")
  groups, d_state = B.shape[2], B.shape[3]
  if groups == 0 or heads % groups:
    raise ValueError(f"n_groups={groups} (B {tuple(B.shape)}) must divide heads={heads} "
                     f"(x {tuple(x.shape)})")
  for name, a in (("D", D), ("dt_bias", dt_bias)):
    if a is not None:
      reg.check_float(name, a)
      reg.check_shape(name, a, (heads,), "[heads]")
  if initial_state is not None:
    reg.check_float("initial_state", initial_state)
    reg.check_shape("initial_state", initial_state, (batch, heads, head_dim, d_state),
                    "[batch, heads, head_dim, d_state]")
  if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
        D: jax.Array | None = None, dt_bias: jax.Array | None = None, dt_softplus: bool = False,
        chunk_size: int | None = None, initial_state: jax.Array | None = None,
        return_final_state: bool = False, impl: str = "auto") -> Any:
  """Mamba-2's SSD: a scalar-decay-per-head selective state space, computed by `impl`.

  Args:
    x: [batch, length, heads, head_dim] input.
    dt: [batch, length, heads] step sizes (before bias/softplus).
    A: [heads] decay rate per head (negative in Mamba-2: -exp(A_log)).
    B, C: [batch, length, n_groups, d_state]; head h reads group h // (heads // n_groups).
    D: optional [heads] skip connection.
    dt_bias: optional [heads], added to dt (before the softplus, when there is one).
    dt_softplus: apply softplus to dt + dt_bias.
    chunk_size: chunk length of the block decomposition (None: the impl's default, 64). It changes
      rounding, not the result; "reference" ignores it; "pallas" needs a power of two in [16, 128].
    initial_state: optional [batch, heads, head_dim, d_state] state before the first token.
    return_final_state: also return the float32 state after the last token.
    impl: "auto", "reference", "chunked" or "pallas".

  Returns:
    y [batch, length, heads, head_dim] in x's dtype, or (y, final_state [batch, heads, head_dim,
    d_state] float32).
  """
  validate(x, dt, A, B, C, D, dt_bias, initial_state, chunk_size)
  call = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
              chunk_size=chunk_size, initial_state=initial_state,
              return_final_state=return_final_state)
  chosen = REGISTRY.resolve(impl, **call)
  x_, dt_, A_, B_, C_ = (call.pop(k) for k in ("x", "dt", "A", "B", "C"))
  return chosen.fn(x_, dt_, A_, B_, C_, **call)
