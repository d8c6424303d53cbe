"""A Hyena mixer of order 2 (Poli et al. 2023, "Hyena Hierarchy", arXiv 2302.10866): a gated long
convolution whose filter is an implicit function of the lag, the gated-convolution family that
Zoology (Arora et al. 2023, arXiv 2312.04927) studies on associative recall.

  (q, k, v) = short causal depthwise conv (d_conv taps) of in_proj(x)      each [batch, L, d_model]
  u = k * v
  y = q * (h (*) u + D * u)        (*): causal convolution over the sequence, per channel
  out = out_proj(y)

The long filter h[t, c] (t = lag) is implicit: a small MLP with sine activations over positional
features of the lag, times a fixed exponential window,

  h[t, c] = MLP(sin(w_k t), cos(w_k t) for k < bands)[c] * exp(-rate_c t)

with w_k = 10000^(-k / bands) and rate_c log-spaced in [decay_min, decay_max] across channels. Hyena
feeds the MLP the lag normalised by the sequence length; here the features are of the absolute lag
so that h[t] does not depend on the length of the call: the filter extrapolates to any length, and
prefill, decode and the full pass see the same filter. The convolution is an FFT over 2L points
(`ssm_lab.layers.s4d.causal_conv`), O(L log L) per channel (directly on the CPU, O(L^2)).

Decoding: a long convolution reads the whole input history, so the cache holds u = k * v of every
position so far, "history" [batch, max_len, d_model] (compute dtype), plus the short conv's last
inputs "conv" [batch, d_conv - 1, 3 * d_model]. Like a linear KV cache it grows with the context and
holds at most max_len positions (init_cache's max_len; writes past it are clamped, so keep prompt +
generated tokens within max_len). A decode step evaluates the filter at lags 0 .. max_len - 1 and
takes, for each new token, its dot product with the history.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab.errors import ConfigError
from ssm_lab.layers import registry
from ssm_lab.layers.mamba import causal_depthwise_conv
from ssm_lab.layers.s4d import causal_conv


def lag_features(lags: jax.Array, bands: int) -> jax.Array:
  """[n] lags -> [n, 2 * bands] float32: sin and cos of lag * 10000^(-k / bands), k < bands."""
  freqs = 10000.0 ** (-jnp.arange(bands, dtype=jnp.float32) / bands)
  angles = lags.astype(jnp.float32)[:, None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def window_rates(channels: int, decay_min: float, decay_max: float) -> jax.Array:
  """[channels] decay rates, log-spaced from decay_min to decay_max: channels see from ~1/decay_max
  to ~1/decay_min tokens back."""
  if channels == 1:
    return jnp.full((1,), decay_min, jnp.float32)
  return jnp.exp(jnp.linspace(math.log(decay_min), math.log(decay_max), channels,
                              dtype=jnp.float32))


class ImplicitFilter(nn.Module):
  """length -> h [length, channels] float32, h[t] for lags t = 0 .. length - 1 (see the module
  docstring). Each hidden layer is sin(freq * (W z + b)) with a learned per-unit frequency (Hyena's
  sine activation; init 1)."""

  channels: int
  width: int = 64
  depth: int = 2
  bands: int = 8
  decay_min: float = 1e-3
  decay_max: float = 0.5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    t = jnp.arange(length, dtype=jnp.float32)
    z = lag_features(t, self.bands)
    for i in range(self.depth):
      z = nn.Dense(self.width, dtype=jnp.float32, param_dtype=self.param_dtype, name=f"dense_{i}")(z)
      freq = self.param(f"freq_{i}", nn.initializers.ones, (self.width,), self.param_dtype)
      z = jnp.sin(freq.astype(jnp.float32) * z)
    h = nn.Dense(self.channels, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                 name="out")(z)
    return h * jnp.exp(-t[:, None] * window_rates(self.channels, self.decay_min, self.decay_max))


class HyenaMixer(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model].

  The convolutions run across the whole row (packed documents are not isolated, as in the SSM
  mixers). Modes: "full" returns y; "prefill" runs the "full" computation and also returns the cache
  (the prompt's history written at positions 0 .. L - 1); "decode" appends the tokens at
  `positions` (the same for every row, as LanguageModel passes them) and convolves over the history.
  """

  d_model: int
  d_conv: int = 3
  filter_width: int = 64
  filter_depth: int = 2
  bands: int = 8
  decay_min: float = 1e-3
  decay_max: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
               mode: str = "full") -> Any:
    del segment_ids   # the convolutions run across the whole row
    if mode not in ("full", "prefill", "decode"):
      raise ValueError(f"mode must be 'full', 'prefill' or 'decode', got {mode!r}")
    if mode != "full" and cache is None:
      raise ValueError(f"mode={mode!r} needs a cache (see init_hyena_cache)")
    if mode == "decode" and positions is None:
      raise ValueError("mode='decode' needs positions (where the new tokens go in the history)")
    d, f32 = self.d_model, jnp.float32
    dense = lambda feats, name: nn.Dense(feats, use_bias=False, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    qkv = dense(3 * d, "in_proj")(x)
    qkv, new_conv = causal_depthwise_conv(
        qkv, d_conv=self.d_conv, mode=mode, cache_conv=None if cache is None else cache["conv"],
        dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    u = k * v                                                    # [batch, n, d], compute dtype
    D = self.param("D", nn.initializers.ones, (d,), self.param_dtype).astype(f32)
    filt = ImplicitFilter(d, self.filter_width, self.filter_depth, self.bands, self.decay_min,
                          self.decay_max, self.param_dtype, name="filter")
    n = x.shape[1]
    uf = u.astype(f32)
    if mode == "decode":
      history = cache["history"]
      max_len = history.shape[1]
      start = positions[0, 0].astype(jnp.int32)
      history = jax.lax.dynamic_update_slice(history, u.astype(history.dtype), (0, start, 0))
      h = filt(max_len)                                          # [max_len, d]
      lags = start + jnp.arange(n)[:, None] - jnp.arange(max_len)[None, :]     # [n, max_len]
      taps = jnp.where((lags >= 0)[..., None], h[jnp.clip(lags, 0, max_len - 1)], 0.0)
      y = jnp.einsum("nsd,bsd->bnd", taps, history.astype(f32)) + uf * D
    else:
      y = causal_conv(uf, filt(n)) + uf * D
    out = dense(d, "out_proj")((q.astype(f32) * y).astype(self.dtype))
    if mode == "full":
      return out
    if mode == "prefill":
      max_len = cache["history"].shape[1]
      if n > max_len:
        raise ValueError(f"prefill of {n} tokens does not fit the Hyena history of {max_len} "
                         f"positions (init_cache's max_len)")
      history = jnp.zeros_like(cache["history"]).at[:, :n].set(u.astype(cache["history"].dtype))
    return out, {"conv": new_conv, "history": history}


def init_hyena_cache(batch: int, d_model: int, d_conv: int, max_len: int,
                     dtype: Any) -> dict[str, jax.Array]:
  """An empty decoding cache (`dtype` zeros): conv [batch, d_conv - 1, 3 * d_model] (the short
  conv's last inputs), history [batch, max_len, d_model] (k * v of every position)."""
  return {"conv": jnp.zeros((batch, d_conv - 1, 3 * d_model), dtype),
          "history": jnp.zeros((batch, max_len, d_model), dtype)}


# ------------------------------------------------------------------------------------------------
# Registration: pattern letter "H", config group `config.model.hyena`.


@dataclasses.dataclass(frozen=True)
class HyenaConfig:
  """`config.model.hyena`."""

  d_conv: int = 3              # taps of the short depthwise conv on q, k, v
  filter_width: int = 64       # hidden units of the implicit filter's MLP
  filter_depth: int = 2        # sine layers of that MLP
  bands: int = 8               # sin/cos frequency pairs of the lag features
  decay_min: float = 1e-3      # slowest channel's window rate exp(-rate * t)
  decay_max: float = 0.5       # fastest channel's


def _module(args: Any, cfg: HyenaConfig, *, name: str) -> HyenaMixer:
  return HyenaMixer(d_model=args.d_model, d_conv=cfg.d_conv, filter_width=cfg.filter_width,
                    filter_depth=cfg.filter_depth, bands=cfg.bands, decay_min=cfg.decay_min,
                    decay_max=cfg.decay_max, dtype=args.compute_dtype,
                    param_dtype=args.params_dtype, name=name)


def _flops(args: Any, cfg: HyenaConfig, seq_len: int) -> float:
  """in_proj, short conv and out_proj; the filter MLP (one lag per token); three real FFTs of 2L
  points (~2.5 * 2L log2(2L) each, per channel per sequence) and the spectral product."""
  d, w = args.d_model, cfg.filter_width
  proj = 2 * d * 3 * d + 2 * 3 * d * cfg.d_conv + 2 * d * d
  filt = 2 * (2 * cfg.bands * w + (cfg.filter_depth - 1) * w * w + w * d)
  return proj + filt + d * (15 * math.log2(2 * max(seq_len, 1)) + 6)


def _init_cache(args: Any, cfg: HyenaConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
  return init_hyena_cache(batch, args.d_model, cfg.d_conv, max_len, args.compute_dtype)


def _cache_bytes(args: Any, cfg: HyenaConfig, context_len: int) -> dict[str, int]:
  """The short conv's last inputs, and the k * v history of every position (grows with the context,
  like a KV cache of one d_model vector per token)."""
  item = np.dtype(args.compute_dtype).itemsize
  return {"conv": (cfg.d_conv - 1) * 3 * args.d_model * item,
          "history": context_len * args.d_model * item}


def _validate(args: Any, cfg: HyenaConfig, prefix: str) -> None:
  del args
  for field in ("d_conv", "filter_width", "filter_depth", "bands"):
    if getattr(cfg, field) < 1:
      raise ConfigError(f"{prefix}.{field} must be >= 1, got {getattr(cfg, field)}")
  if not 0 < cfg.decay_min <= cfg.decay_max:
    raise ConfigError(f"{prefix}.decay_min={cfg.decay_min} and {prefix}.decay_max={cfg.decay_max} "
                      f"must satisfy 0 < decay_min <= decay_max")


registry.register(registry.MixerSpec(
    letter="H", name="hyena", description="Hyena order-2 gated long convolution (implicit filter)",
    paper="Poli et al. 2023, arXiv 2302.10866", config=HyenaConfig, module=_module,
    flops_per_token=_flops, init_cache=_init_cache, cache_bytes=_cache_bytes, validate=_validate))
