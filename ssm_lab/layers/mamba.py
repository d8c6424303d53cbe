"""The Mamba-1 mixer (Gu & Dao 2023) with the official parameterisation and initialisation.

  x -> in_proj -> (x, z);  x -> causal depthwise conv1d -> silu -> x_proj -> (dt_low, B, C)
  delta = dt_low @ dt_proj (+ dt_bias inside the scan, softplus);  A = -exp(A_log)
  y = selective_scan(x, delta, A, B, C, D, z) -> out_proj
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssm_lab import ops


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """Bias whose softplus is log-uniform in [dt_min, dt_max] (floored), as Mamba initialises dt."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)   # inverse of softplus
  return init


def symmetric_uniform(limit: float):
  """U(-limit, limit): Mamba's dt_proj weight init with limit = dt_rank ** -0.5."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: A[:, n] = -(n + 1) for every channel, stored as log(n + 1)."""
  del key
  d_inner, d_state = shape
  return jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32),
                                  (d_inner, d_state))).astype(dtype)


class MambaMixer(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model].

  The conv and the scan run across the whole row: packed documents (segment_ids) are not isolated,
  as in the reference Mamba-1 implementation.
  """

  d_model: int
  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  dt_rank: int = 0                     # 0: ceil(d_model / 16)
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    del segment_ids
    d_inner, rank = self.d_inner, self.rank
    dense = lambda feats, name, **kw: nn.Dense(feats, use_bias=False, dtype=self.dtype,
                                               param_dtype=self.param_dtype, name=name, **kw)
    xz = dense(2 * d_inner, "in_proj")(x)
    xs, z = jnp.split(xz, 2, axis=-1)
    xs = nn.Conv(d_inner, kernel_size=(self.d_conv,), feature_group_count=d_inner,
                 padding=[(self.d_conv - 1, 0)], use_bias=True, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="conv1d")(xs)
    xs = jax.nn.silu(xs)
    x_dbl = dense(rank + 2 * self.d_state, "x_proj")(xs)
    dt_low, B, C = jnp.split(x_dbl, [rank, rank + self.d_state], axis=-1)
    dt_kernel = self.param("dt_proj_kernel", symmetric_uniform(rank ** -0.5), (rank, d_inner),
                           self.param_dtype)
    dt_bias = self.param("dt_bias", dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                         (d_inner,), self.param_dtype)
    A_log = self.param("A_log", a_log_init, (d_inner, self.d_state), self.param_dtype)
    D = self.param("D", nn.initializers.ones, (d_inner,), self.param_dtype)
    delta = jnp.einsum("blr,rd->bld", dt_low, dt_kernel.astype(self.dtype))
    y = ops.selective_scan(xs, delta, -jnp.exp(A_log.astype(jnp.float32)), B, C,
                           D=D.astype(jnp.float32), z=z, delta_bias=dt_bias.astype(jnp.float32),
                           delta_softplus=True, impl=self.impl)
    return dense(self.d_model, "out_proj")(y)
