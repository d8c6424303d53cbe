"""Causal self-attention with rotary position embeddings (RoPE) and grouped KV heads (GQA).

Decoding shares this module's parameters and code: in the cache modes ("prefill", "decode") the layer
also reads and returns a KV cache {"k", "v": [batch, cache_len, kv_heads, head_dim], "pos": [batch,
cache_len] int32}, where "pos" holds the absolute position stored in each slot (-1 = empty). Position
p lives in slot p % cache_len, so one layout serves a linear cache (cache_len >= every position) and
a sliding-window ring buffer (cache_len == sliding_window).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab import ops
from ssm_lab.errors import ConfigError
from ssm_lab.layers import registry


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


def attention_cache_len(max_len: int, sliding_window: int) -> int:
  """Slots a layer needs to decode up to `max_len` positions: the window when it is shorter (a ring
  buffer), else `max_len`."""
  return min(max_len, sliding_window) if sliding_window else max_len


def init_attention_cache(batch: int, cache_len: int, num_kv_heads: int, head_dim: int,
                         dtype: Any) -> dict[str, jax.Array]:
  """An empty KV cache: k, v [batch, cache_len, num_kv_heads, head_dim] zeros; pos -1 everywhere."""
  shape = (batch, cache_len, num_kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.full((batch, cache_len), -1, jnp.int32)}


def _write(cache: dict[str, jax.Array], k: jax.Array, v: jax.Array,
           positions: jax.Array) -> dict[str, jax.Array]:
  """Stores k, v [batch, n, kv_heads, head_dim] of `positions` [batch, n] in slots position % len.
  The caller keeps n <= cache_len so that no two tokens share a slot."""
  cache_len = cache["k"].shape[1]
  rows = jnp.arange(k.shape[0])[:, None]
  slots = positions % cache_len
  return {"k": cache["k"].at[rows, slots].set(k.astype(cache["k"].dtype)),
          "v": cache["v"].at[rows, slots].set(v.astype(cache["v"].dtype)),
          "pos": cache["pos"].at[rows, slots].set(positions.astype(jnp.int32))}


class CausalSelfAttention(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model].

  `num_kv_heads` < `num_heads` gives grouped-query attention (1 is multi-query). `sliding_window`
  (0 = off) keeps the w most recent keys. `segment_ids` [batch, length] keeps packed documents apart;
  `positions` [batch, length] restarts RoPE per document (default 0..length-1).

  Modes: "full" returns y (training, scoring). "prefill" computes exactly what "full" does for a
  prompt starting at position 0 and also returns the filled cache: (y, cache). "decode" appends
  x's tokens at `positions` (absolute, [batch, length]) to `cache` and attends over the cache through
  `ops.attention_decode`: (y, cache). A ring buffer (cache_len < the positions reached) decodes one
  token per call.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  sliding_window: int = 0
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  decode_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
               mode: str = "full") -> Any:
    batch, length, d_model = x.shape
    if mode not in ("full", "prefill", "decode"):
      raise ValueError(f"mode must be 'full', 'prefill' or 'decode', got {mode!r}")
    if mode != "full" and cache is None:
      raise ValueError(f"mode={mode!r} needs a cache (see init_attention_cache)")
    dense = lambda feats, name: nn.DenseGeneral(feats, use_bias=False, dtype=self.dtype,
                                                param_dtype=self.param_dtype, name=name)
    q = dense((self.num_heads, self.head_dim), "q_proj")(x)
    k = dense((self.num_kv_heads, self.head_dim), "k_proj")(x)
    v = dense((self.num_kv_heads, self.head_dim), "v_proj")(x)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    window = self.sliding_window or None
    if mode == "decode":
      cache_len = cache["k"].shape[1]
      if length > cache_len or (window is not None and cache_len <= window and length > 1):
        raise ValueError(f"decode of {length} tokens into a cache of {cache_len} slots (sliding "
                         f"window {self.sliding_window}): a ring buffer takes one token per call, "
                         f"a linear cache at most cache_len")
      cache = _write(cache, k, v, positions)
      out = ops.attention_decode(q, cache["k"], cache["v"], q_positions=positions,
                                 kv_positions=cache["pos"], sliding_window=window,
                                 impl=self.decode_impl)
    else:
      out = ops.attention(q, k, v, causal=True, sliding_window=window, segment_ids=segment_ids,
                          impl=self.impl)
      if mode == "prefill":
        # Only the last cache_len tokens can still be attended to (all of them for a linear cache).
        keep = min(length, cache["k"].shape[1])
        cache = _write(cache, k[:, length - keep:], v[:, length - keep:],
                       positions[:, length - keep:])
    y = nn.DenseGeneral(d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj")(out)
    return y if mode == "full" else (y, cache)


# ------------------------------------------------------------------------------------------------
# Registration: pattern letter "A", config group `config.model.attention`.


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """`config.model.attention`."""

  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0            # 0: d_model // num_heads
  rope_theta: float = 10000.0
  sliding_window: int = 0      # 0: full causal attention
  impl: str = "auto"           # ssm_lab.ops.attention impl


def head_dim_of(cfg: AttentionConfig, d_model: int) -> int:
  return cfg.head_dim or d_model // cfg.num_heads


def _module(args: Any, cfg: AttentionConfig, *, name: str) -> CausalSelfAttention:
  return CausalSelfAttention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             head_dim=head_dim_of(cfg, args.d_model), rope_theta=cfg.rope_theta,
                             sliding_window=cfg.sliding_window, impl=cfg.impl,
                             dtype=args.compute_dtype, param_dtype=args.params_dtype, name=name)


def _flops(args: Any, cfg: AttentionConfig, seq_len: int) -> float:
  """Projections plus QK^T and PV; a causal token at position t sees t + 1 keys, (L + 1) / 2 on
  average, capped by the sliding window."""
  d, h, kvh, hd = args.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim_of(cfg, args.d_model)
  proj = 2 * d * (h * hd + 2 * kvh * hd) + 2 * h * hd * d
  keys = (seq_len + 1) / 2
  if cfg.sliding_window:
    keys = min(keys, cfg.sliding_window)
  return proj + 2 * 2 * h * hd * keys


def _init_cache(args: Any, cfg: AttentionConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
  return init_attention_cache(batch, attention_cache_len(max_len, cfg.sliding_window),
                              cfg.num_kv_heads, head_dim_of(cfg, args.d_model), args.compute_dtype)


def _cache_bytes(args: Any, cfg: AttentionConfig, context_len: int) -> dict[str, int]:
  """K and V of T = min(context, window) slots in the compute dtype, plus int32 slot positions."""
  t = attention_cache_len(context_len, cfg.sliding_window)
  item = np.dtype(args.compute_dtype).itemsize
  return {"kv": 2 * t * cfg.num_kv_heads * head_dim_of(cfg, args.d_model) * item + 4 * t}


def _validate(args: Any, cfg: AttentionConfig, prefix: str) -> None:
  if cfg.num_heads < 1 or cfg.num_kv_heads < 1 or cfg.num_heads % cfg.num_kv_heads:
    raise ConfigError(f"{prefix}.num_heads={cfg.num_heads} must be a positive multiple of "
                      f"{prefix}.num_kv_heads={cfg.num_kv_heads}")
  if not cfg.head_dim and args.d_model % cfg.num_heads:
    raise ConfigError(f"config.model.d_model={args.d_model} is not divisible by "
                      f"{prefix}.num_heads={cfg.num_heads}; set {prefix}.head_dim")
  if cfg.sliding_window < 0:
    raise ConfigError(f"{prefix}.sliding_window must be >= 0 (0: off), got {cfg.sliding_window}")


def _from_hf_llama(config: dict[str, Any], t: Any) -> tuple[dict[str, Any], Any]:
  from ssm_lab.models.hf_import import convert_llama  # noqa: PLC0415 (heavy, only for imports)
  return convert_llama(config, t, letter="A", group="attention")


registry.register(registry.MixerSpec(
    letter="A", name="attention", description="causal self-attention (RoPE, grouped KV heads)",
    paper="Vaswani et al. 2017; RoPE: Su et al. 2021; GQA: Ainslie et al. 2023",
    config=AttentionConfig, module=_module, flops_per_token=_flops, init_cache=_init_cache,
    cache_bytes=_cache_bytes, validate=_validate,
    renamed={"num_heads": "num_heads", "num_kv_heads": "num_kv_heads", "head_dim": "head_dim",
             "rope_theta": "rope_theta", "sliding_window": "sliding_window",
             "attention_impl": "impl"},
    hf_architectures={"LlamaForCausalLM": _from_hf_llama}))
