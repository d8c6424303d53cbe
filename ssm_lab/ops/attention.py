"""Softmax attention behind one function and `impl=`.

Contract (every impl): q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim]
with heads % kv_heads == 0 (grouped / multi-query KV heads). Causal masking aligns the last query with
the last key: query i sits at absolute position i + kv_len - q_len. `sliding_window=w` (causal only)
keeps the w most recent keys including the query's own position. `segment_ids` [batch, length]
(q_len == kv_len) blocks attention across segments. A query with no visible key outputs zeros.
Logits, softmax and accumulation are float32; the output has q's dtype.

Implementations (see `REGISTRY`):
  "reference"  einsum + masked softmax; materialises [batch, heads, q_len, kv_len]: the oracle.
  "xla"        `jax.nn.dot_product_attention(implementation="xla")`.
  "cudnn", "pallas"  GPU kernels, registered by their own modules when they exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssm_lab.ops import registry as reg

REGISTRY = reg.OpRegistry("attention")


def visibility_mask(q_len: int, kv_len: int, *, causal: bool, sliding_window: int | None,
                    segment_ids: jax.Array | None) -> jax.Array | None:
  """Boolean mask, True where query i may attend key j.

  Returns [batch or 1, 1, q_len, kv_len], or None when nothing is masked.
  """
  mask = None
  if causal:
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k_pos = jnp.arange(kv_len)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
      mask = mask & (k_pos > q_pos - sliding_window)
    mask = mask[None, None]
  if segment_ids is not None:
    seg = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = seg if mask is None else mask & seg
  return mask


def _reference(q, k, v, *, causal, sliding_window, segment_ids, scale):
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  f32 = jnp.float32
  qg = q.astype(f32).reshape(batch, q_len, kv_heads, groups, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(f32)) * scale
  logits = logits.reshape(batch, heads, q_len, k.shape[1])
  mask = visibility_mask(q_len, k.shape[1], causal=causal, sliding_window=sliding_window,
                         segment_ids=segment_ids)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  p = p.reshape(batch, kv_heads, groups, q_len, k.shape[1])
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(f32))
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def _xla(q, k, v, *, causal, sliding_window, segment_ids, scale):
  q_len, kv_len = q.shape[1], k.shape[1]
  if q_len == kv_len and segment_ids is None:
    # jax's own causal/local masks are top-left aligned, which equals ours when q_len == kv_len.
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=window, implementation="xla")
  mask = visibility_mask(q_len, kv_len, causal=causal, sliding_window=sliding_window,
                         segment_ids=segment_ids)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, implementation="xla")
  if causal and q_len > kv_len:
    # Queries before the first key see nothing: the contract says zeros, not a uniform average.
    seen = (jnp.arange(q_len) + kv_len - q_len) >= 0
    out = jnp.where(seen[None, :, None, None], out, jnp.zeros_like(out))
  return out


REGISTRY.register(reg.Impl("reference", _reference, reg.always, auto_priority={}))
REGISTRY.register(reg.Impl("xla", _xla, reg.always, auto_priority={"cpu": 10, "gpu": 10,
                                                                   "tpu": 10}))


def validate(q, k, v, causal, sliding_window, segment_ids):
  for name, x in (("q", q), ("k", k), ("v", v)):
    reg.check_float(name, x)
    reg.check_rank(name, x, 4, "[batch, length, heads, head_dim]")
  batch, q_len, heads, head_dim = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape [batch, kv_len, kv_heads, head_dim], got "
                     f"k {tuple(k.shape)} and v {tuple(v.shape)}")
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim")
  if heads % k.shape[2]:
    raise ValueError(f"heads={heads} (q {tuple(q.shape)}) must be a multiple of kv_heads="
                     f"{k.shape[2]} (k {tuple(k.shape)})")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype.name}, {k.dtype.name}, "
                     f"{v.dtype.name}")
  if sliding_window is not None:
    if not causal:
      raise ValueError("sliding_window needs causal=True (it keeps the most recent keys)")
    if int(sliding_window) < 1:
      raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
  if segment_ids is not None:
    if q_len != k.shape[1]:
      raise ValueError(f"segment_ids need q_len == kv_len, got q {tuple(q.shape)} and k "
                       f"{tuple(k.shape)}")
    reg.check_shape("segment_ids", segment_ids, (batch, q_len), "[batch, length]")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype.name}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              sliding_window: int | None = None, segment_ids: jax.Array | None = None,
              scale: float | None = None, impl: str = "auto") -> jax.Array:
  """Multi-head softmax attention with grouped KV heads.

  Args:
    q: [batch, q_len, heads, head_dim]. k, v: [batch, kv_len, kv_heads, head_dim].
    causal: mask future keys, aligning the last query with the last key.
    sliding_window: keep only the w most recent keys (including the query's own); needs causal.
    segment_ids: [batch, length] ints; tokens attend only within their segment (q_len == kv_len).
    scale: logit scale, default 1/sqrt(head_dim).
    impl: "auto", "reference", "xla" (and "cudnn", "pallas" where registered).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  validate(q, k, v, causal, sliding_window, segment_ids)
  scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
  call = dict(q=q, k=k, v=v, causal=causal, sliding_window=sliding_window,
              segment_ids=segment_ids, scale=scale)
  chosen = REGISTRY.resolve(impl, **call)
  q_, k_, v_ = call.pop("q"), call.pop("k"), call.pop("v")
  return chosen.fn(q_, k_, v_, **call)
