"""Softmax attention behind one function and `impl=`.

Contract (every impl): q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim]
with heads % kv_heads == 0 (grouped / multi-query KV heads). Causal masking aligns the last query with
the last key: query i sits at absolute position i + kv_len - q_len. `sliding_window=w` (causal only)
keeps the w most recent keys including the query's own position. `segment_ids` [batch, length]
(q_len == kv_len) blocks attention across segments. A query with no visible key outputs zeros.
Logits, softmax and accumulation are float32; the output has q's dtype.

Implementations (see `REGISTRY`):
  "reference"  einsum + masked softmax; materialises [batch, heads, q_len, kv_len]: the oracle.
  "xla"        `jax.nn.dot_product_attention(implementation="xla")`; also materialises the L x L
               logits (34 GB of float32 logits alone at L = 16K, 32K tokens x 16 heads: not run there).
  "cudnn"      `jax.nn.dot_product_attention(implementation="cudnn")`: bfloat16, head_dim a multiple of
               8 up to 128, q_len == kv_len, no segment ids, CUDA GPUs only (`supports` says which).
  "pallas"     our FlashAttention-2 Pallas (Triton) kernel, `ssm_lab.ops.pallas.attention`: head_dim 64
               or 128, everything else in the contract (f32, segment ids, q_len != kv_len).

`impl="auto"`: xla on the CPU; on a GPU cudnn, then pallas, then xla, by measurement on the H100
(bf16, causal, 16 heads, 32K tokens per batch, forward+backward, ms; benchmarks/results/attention.md):

  head_dim 64      L=1K    4K     16K    64K        head_dim 128   L=1K   4K     16K    64K
  cudnn            1.12    2.65   9.02   69.6       cudnn          1.76   4.29   14.5   108
  pallas           1.03    3.24   11.7   89.0       pallas         1.80   5.46   19.9   150
  xla              10.3    35.2   -      -          xla            11.1   36.3   -      -

cuDNN is 22-45% faster from 4K on (GQA included) and at most 8% slower at 1K, so it goes first
wherever it serves the call; the Pallas kernel serves the rest at 6-11x XLA's speed and without its
L x L memory.

`attention_decode` (below) attends a short query block to a preallocated KV cache by absolute
positions (linear caches and sliding-window ring buffers alike); impls "reference" and "xla".
"""

from __future__ import annotations

import jax
import jax.extend
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


def masked_softmax_attention(q, k, v, mask, scale):
  """Einsum + masked softmax in float32, GQA by grouping query heads: the oracle's arithmetic.

  q [batch, q_len, heads, d]; k, v [batch, kv_len, kv_heads, d]; mask broadcastable to
  [batch, heads, q_len, kv_len] (True = visible) or None. Rows with no visible key give zeros.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  f32 = jnp.float32
  qg = q.astype(f32).reshape(batch, q_len, kv_heads, groups, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(f32)) * scale
  logits = logits.reshape(batch, heads, q_len, kv_len)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  p = p.reshape(batch, kv_heads, groups, q_len, kv_len)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(f32))
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def _reference(q, k, v, *, causal, sliding_window, segment_ids, scale):
  mask = visibility_mask(q.shape[1], k.shape[1], causal=causal, sliding_window=sliding_window,
                         segment_ids=segment_ids)
  return masked_softmax_attention(q, k, v, mask, scale)


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


def _cudnn(q, k, v, *, causal, sliding_window, segment_ids, scale):
  del segment_ids  # `_cudnn_supports` refuses them
  # q_len == kv_len here, so jax's top-left aligned causal/local masks equal ours.
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                      local_window_size=window, implementation="cudnn")


def _on_cuda() -> str | None:
  """None on an NVIDIA GPU backend, else why not."""
  if jax.default_backend() != "gpu":
    return f"needs a CUDA GPU backend, got {jax.default_backend()!r}"
  platform_version = jax.extend.backend.get_backend().platform_version
  if "cuda" not in str(platform_version).lower():
    return f"needs a CUDA GPU, got platform {platform_version!r}"
  return None


def _cudnn_supports(*, q, k, v, causal, sliding_window, segment_ids, scale) -> str | None:
  del v, causal, sliding_window, scale
  if q.dtype != jnp.bfloat16:
    return f"cuDNN flash attention takes bfloat16 (or float16) inputs, got {q.dtype.name}"
  head_dim = q.shape[-1]
  if head_dim % 8 or head_dim > 128:
    return f"cuDNN needs head_dim a multiple of 8 and <= 128, got {head_dim}"
  if segment_ids is not None:
    return "segment_ids are not expressible through jax.nn.dot_product_attention's cuDNN path"
  if q.shape[1] != k.shape[1]:
    return (f"q_len {q.shape[1]} != kv_len {k.shape[1]}: cuDNN's causal mask is top-left aligned, "
            f"the contract's is bottom-right")
  return _on_cuda()


# Auto order on the GPU: see the module docstring for the measurements behind it.
REGISTRY.register(reg.Impl("reference", _reference, reg.always, auto_priority={}))
REGISTRY.register(reg.Impl("xla", _xla, reg.always, auto_priority={"cpu": 10, "gpu": 10,
                                                                   "tpu": 10}))
REGISTRY.register(reg.Impl("cudnn", _cudnn, _cudnn_supports, auto_priority={"gpu": 30}))


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


# ------------------------------------------------------------------------------------------------
# Decoding: a short query block against a preallocated KV cache.

DECODE_REGISTRY = reg.OpRegistry("attention_decode")


def decode_visibility_mask(q_positions: jax.Array, kv_positions: jax.Array,
                           sliding_window: int | None) -> jax.Array:
  """[batch, 1, q_len, cache_len] bool: key j visible to query i iff 0 <= kv_pos[j] <= q_pos[i]
  (and kv_pos[j] > q_pos[i] - sliding_window when set)."""
  qp = q_positions[:, :, None]
  kp = kv_positions[:, None, :]
  mask = (kp >= 0) & (kp <= qp)
  if sliding_window is not None:
    mask = mask & (kp > qp - sliding_window)
  return mask[:, None]


def _decode_reference(q, k_cache, v_cache, *, q_positions, kv_positions, sliding_window, scale):
  mask = decode_visibility_mask(q_positions, kv_positions, sliding_window)
  return masked_softmax_attention(q, k_cache, v_cache, mask, scale)


def _decode_xla(q, k_cache, v_cache, *, q_positions, kv_positions, sliding_window, scale):
  mask = decode_visibility_mask(q_positions, kv_positions, sliding_window)
  out = jax.nn.dot_product_attention(q, k_cache, v_cache, scale=scale, mask=mask,
                                     implementation="xla")
  # A query with no visible slot outputs zeros (the contract), not jax's uniform average.
  seen = jnp.any(mask[:, 0], axis=-1)  # [batch, q_len]
  return jnp.where(seen[:, :, None, None], out, jnp.zeros_like(out))


DECODE_REGISTRY.register(reg.Impl("reference", _decode_reference, reg.always, auto_priority={}))
DECODE_REGISTRY.register(reg.Impl("xla", _decode_xla, reg.always,
                                  auto_priority={"cpu": 10, "gpu": 10, "tpu": 10}))


def validate_decode(q, k_cache, v_cache, q_positions, kv_positions, sliding_window):
  for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
    reg.check_float(name, x)
  reg.check_rank("q", q, 4, "[batch, q_len, heads, head_dim]")
  reg.check_rank("k_cache", k_cache, 4, "[batch, cache_len, kv_heads, head_dim]")
  reg.check_rank("v_cache", v_cache, 4, "[batch, cache_len, kv_heads, head_dim]")
  batch, q_len, heads, head_dim = q.shape
  if k_cache.shape != v_cache.shape:
    raise ValueError(f"k_cache and v_cache must have the same shape [batch, cache_len, kv_heads, "
                     f"head_dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
  if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
    raise ValueError(f"k_cache {tuple(k_cache.shape)} must match q {tuple(q.shape)} in batch and "
                     f"head_dim")
  if heads % k_cache.shape[2]:
    raise ValueError(f"heads={heads} (q {tuple(q.shape)}) must be a multiple of kv_heads="
                     f"{k_cache.shape[2]} (k_cache {tuple(k_cache.shape)})")
  if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
    raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype.name}, "
                     f"{k_cache.dtype.name}, {v_cache.dtype.name}")
  reg.check_shape("q_positions", q_positions, (batch, q_len), "[batch, q_len]")
  reg.check_shape("kv_positions", kv_positions, (batch, k_cache.shape[1]), "[batch, cache_len]")
  for name, x in (("q_positions", q_positions), ("kv_positions", kv_positions)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers, got {x.dtype.name}")
  if sliding_window is not None and int(sliding_window) < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")


def attention_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *,
                     q_positions: jax.Array, kv_positions: jax.Array,
                     sliding_window: int | None = None, scale: float | None = None,
                     impl: str = "auto") -> jax.Array:
  """Attention of a short query block (1 to n tokens) against a preallocated KV cache.

  Visibility is by absolute position, so one function serves a linear cache (slots past the count
  of valid entries hold -1) and a sliding-window ring buffer (slot j holds whichever position was
  written there last): key j is visible to query i iff kv_positions[j] >= 0 and
  kv_positions[j] <= q_positions[i] (and kv_positions[j] > q_positions[i] - sliding_window when
  set). A query with no visible slot outputs zeros. Softmax and accumulation are float32.

  Args:
    q: [batch, q_len, heads, head_dim].
    k_cache, v_cache: [batch, cache_len, kv_heads, head_dim]; heads % kv_heads == 0.
    q_positions: [batch, q_len] ints, absolute positions of the queries.
    kv_positions: [batch, cache_len] ints, absolute position held in each slot, -1 if empty.
    sliding_window: keep keys with position > q_position - sliding_window.
    scale: logit scale, default 1/sqrt(head_dim).
    impl: "auto", "reference" or "xla".

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  validate_decode(q, k_cache, v_cache, q_positions, kv_positions, sliding_window)
  scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
  call = dict(q=q, k_cache=k_cache, v_cache=v_cache, q_positions=q_positions.astype(jnp.int32),
              kv_positions=kv_positions.astype(jnp.int32),
              sliding_window=None if sliding_window is None else int(sliding_window), scale=scale)
  chosen = DECODE_REGISTRY.resolve(impl, **call)
  q_, k_, v_ = call.pop("q"), call.pop("k_cache"), call.pop("v_cache")
  return chosen.fn(q_, k_, v_, **call)
