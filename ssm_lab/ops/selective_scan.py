"""The selective scan of Mamba-1 (Gu & Dao 2023, Algorithm 2), behind one function and `impl=`.

Semantics are those of mamba_ssm's `selective_scan_ref`:

  delta <- softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
  h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          h: [batch, d_inner, d_state]
  y_t    = <C_t, h_t> + D * u_t ;  y <- y * silu(z)

Implementations (see `REGISTRY`):
  "reference"    token-by-token `lax.scan`, float32 state: the oracle every other impl is tested against.
  "associative"  `jax.lax.associative_scan` over (decay, input) pairs; materialises
                 [batch, length, d_inner, d_state] in float32, so memory grows with that product.
  "pallas"       fused Pallas GPU kernel (ssm_lab.ops.pallas.selective_scan), registered there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ssm_lab.ops import registry as reg

REGISTRY = reg.OpRegistry("selective_scan")


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
  """Float32 working copies with the groups of B and C expanded to channels.

  Returns delta (post bias/softplus) [b, l, d], u [b, l, d], A [d, n], Bx, Cx [b, l, d, n].
  """
  d_inner = u.shape[-1]
  groups = B.shape[2]
  f32 = jnp.float32
  delta = delta.astype(f32)
  if delta_bias is not None:
    delta = delta + delta_bias.astype(f32)
  if delta_softplus:
    delta = jax.nn.softplus(delta)
  rep = d_inner // groups
  Bx = jnp.repeat(B.astype(f32), rep, axis=2)
  Cx = jnp.repeat(C.astype(f32), rep, axis=2)
  return delta, u.astype(f32), A.astype(f32), Bx, Cx


def _finish(y, u, D, z, out_dtype):
  if D is not None:
    y = y + u * D.astype(jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y.astype(out_dtype)


def _reference(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus, initial_state,
               return_final_state):
  delta, uf, Af, Bx, Cx = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
  batch, _, d_inner = u.shape
  h0 = (jnp.zeros((batch, d_inner, A.shape[1]), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))

  def step(h, xs):
    dt, ut, bt, ct = xs                               # [b, d], [b, d], [b, d, n], [b, d, n]
    h = jnp.exp(dt[..., None] * Af) * h + (dt * ut)[..., None] * bt
    return h, jnp.sum(h * ct, axis=-1)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  h_last, ys = jax.lax.scan(step, h0, (time_major(delta), time_major(uf), time_major(Bx),
                                       time_major(Cx)))
  y = _finish(jnp.moveaxis(ys, 0, 1), uf, D, z, u.dtype)
  return (y, h_last) if return_final_state else y


def _associative(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus, initial_state,
                 return_final_state):
  delta, uf, Af, Bx, Cx = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
  decay = jnp.exp(delta[..., None] * Af)              # [b, l, d, n]
  inp = (delta * uf)[..., None] * Bx                  # [b, l, d, n]
  if initial_state is not None:
    # h_0 enters through the first step: h_1 = a_1 h_0 + b_1.
    inp = inp.at[:, 0].add(decay[:, 0] * initial_state.astype(jnp.float32))

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, h = jax.lax.associative_scan(combine, (decay, inp), axis=1)
  y = _finish(jnp.einsum("bldn,bldn->bld", h, Cx), uf, D, z, u.dtype)
  return (y, h[:, -1]) if return_final_state else y


REGISTRY.register(reg.Impl("reference", _reference, reg.always, auto_priority={}))
REGISTRY.register(reg.Impl("associative", _associative, reg.always,
                           auto_priority={"cpu": 10, "gpu": 10, "tpu": 10}))


def validate(u, delta, A, B, C, D, z, delta_bias, initial_state):
  """Checks the contract's shapes and dtypes; returns B, C as [batch, length, n_groups, d_state]."""
  for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
    reg.check_float(name, x)
  reg.check_rank("u", u, 3, "[batch, length, d_inner]")
  batch, length, d_inner = u.shape
  reg.check_shape("delta", delta, u.shape, "[batch, length, d_inner]")
  reg.check_rank("A", A, 2, "[d_inner, d_state]")
  if A.shape[0] != d_inner:
    raise ValueError(f"A must have shape [d_inner, d_state] with d_inner={d_inner} (from u "
                     f"{tuple(u.shape)}), got {tuple(A.shape)}")
  d_state = A.shape[1]
  if B.ndim == 3:
    B = B[:, :, None, :]
  if C.ndim == 3:
    C = C[:, :, None, :]
  for name, x in (("B", B), ("C", C)):
    if x.ndim != 4 or x.shape[:2] != (batch, length) or x.shape[3] != d_state:
      raise ValueError(f"{name} must have shape [batch, length, d_state] or [batch, length, "
                       f"n_groups, d_state] with batch={batch}, length={length}, "
                       f"d_state={d_state}; got {tuple(x.shape)}")
  if B.shape[2] != C.shape[2]:
    raise ValueError(f"B and C must have the same n_groups, got B {tuple(B.shape)} and C "
                     f"{tuple(C.shape)}")
  if d_inner % B.shape[2]:
    raise ValueError(f"n_groups={B.shape[2]} (B {tuple(B.shape)}) must divide d_inner={d_inner}")
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None:
      reg.check_float(name, x)
      reg.check_shape(name, x, (d_inner,), "[d_inner]")
  if z is not None:
    reg.check_float("z", z)
    reg.check_shape("z", z, u.shape, "[batch, length, d_inner]")
  if initial_state is not None:
    reg.check_float("initial_state", initial_state)
    reg.check_shape("initial_state", initial_state, (batch, d_inner, d_state),
                    "[batch, d_inner, d_state]")
  return B, C


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                   D: jax.Array | None = None, z: jax.Array | None = None,
                   delta_bias: jax.Array | None = None, delta_softplus: bool = False,
                   initial_state: jax.Array | None = None, return_final_state: bool = False,
                   impl: str = "auto") -> Any:
  """Mamba-1 selective scan.

  Args:
    u: [batch, length, d_inner] input.
    delta: [batch, length, d_inner] step sizes (before bias/softplus).
    A: [d_inner, d_state] (negative real in Mamba: -exp(A_log)).
    B, C: [batch, length, d_state] or [batch, length, n_groups, d_state]; channel i reads group
      i // (d_inner // n_groups).
    D: optional [d_inner] skip. z: optional [batch, length, d_inner] gate (y * silu(z)).
    delta_bias: optional [d_inner], added to delta before the optional softplus.
    initial_state: optional [batch, d_inner, d_state] state before the first token.
    return_final_state: also return the float32 state after the last token.
    impl: "auto", "reference", "associative" or "pallas".

  Returns:
    y [batch, length, d_inner] in u's dtype, or (y, final_state [batch, d_inner, d_state] float32).
  """
  B, C = validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
  call = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
              delta_softplus=delta_softplus, initial_state=initial_state,
              return_final_state=return_final_state)
  chosen = REGISTRY.resolve(impl, **call)
  u_, delta_, A_, B_, C_ = (call.pop(k) for k in ("u", "delta", "A", "B", "C"))
  return chosen.fn(u_, delta_, A_, B_, C_, **call)
