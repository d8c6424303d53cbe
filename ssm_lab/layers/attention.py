"""Causal self-attention with rotary position embeddings (RoPE) and grouped KV heads (GQA)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssm_lab import ops


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """[head_dim // 2] inverse frequencies theta^(-2i/head_dim) (Su et al. 2021)."""
  return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (x[i], x[i + d/2]) by position * freq_i (the rotate-half layout of GPT-NeoX and
  LLaMA, so imported checkpoints line up). x: [batch, length, heads, head_dim]; positions:
  [batch, length]."""
  half = x.shape[-1] // 2
  angles = positions[..., None].astype(jnp.float32) * rope_frequencies(x.shape[-1], theta)
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class CausalSelfAttention(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model].

  `num_kv_heads` < `num_heads` gives grouped-query attention (1 is multi-query). `sliding_window`
  (0 = off) keeps the w most recent keys. `segment_ids` [batch, length] keeps packed documents apart;
  `positions` [batch, length] restarts RoPE per document (default 0..length-1).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  sliding_window: int = 0
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    batch, length, d_model = x.shape
    dense = lambda feats, name: nn.DenseGeneral(feats, use_bias=False, dtype=self.dtype,
                                                param_dtype=self.param_dtype, name=name)
    q = dense((self.num_heads, self.head_dim), "q_proj")(x)
    k = dense((self.num_kv_heads, self.head_dim), "k_proj")(x)
    v = dense((self.num_kv_heads, self.head_dim), "v_proj")(x)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    out = ops.attention(q, k, v, causal=True, sliding_window=self.sliding_window or None,
                        segment_ids=segment_ids, impl=self.impl)
    return nn.DenseGeneral(d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="o_proj")(out)
