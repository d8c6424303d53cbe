"""The Mamba-1 mixer (Gu & Dao 2023) with the official parameterisation and initialisation.

  x -> in_proj -> (x, z);  x -> causal depthwise conv1d -> silu -> x_proj -> (dt_low, B, C)
  delta = dt_low @ dt_proj (+ dt_bias inside the scan, softplus);  A = -exp(A_log)
  y = selective_scan(x, delta, A, B, C, D, z) -> out_proj

Decoding carries a constant-size cache {"conv": [batch, d_conv - 1, d_inner] (the last conv inputs),
"ssm": [batch, d_inner, d_state] float32} whatever the context length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab import ops
from ssm_lab.errors import ConfigError
from ssm_lab.layers import registry


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


def init_mamba_cache(batch: int, d_inner: int, d_state: int, d_conv: int,
                     dtype: Any) -> dict[str, jax.Array]:
  """An empty decoding cache: conv [batch, d_conv - 1, d_inner] (`dtype`), ssm [batch, d_inner,
  d_state] float32, both zeros (the state before the first token)."""
  return {"conv": jnp.zeros((batch, d_conv - 1, d_inner), dtype),
          "ssm": jnp.zeros((batch, d_inner, d_state), jnp.float32)}


def conv_tail(history: jax.Array, xs: jax.Array, d_conv: int) -> jax.Array:
  """The last d_conv - 1 conv inputs after `xs` [batch, length, ch] follows `history` [batch,
  d_conv - 1, ch]: the next call's conv state."""
  return jnp.concatenate([history, xs.astype(history.dtype)], axis=1)[:, xs.shape[1]:]


def torch_conv_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Conv1d weight and bias init, which both
  official Mamba implementations keep for their depthwise conv (fan_in = d_conv)."""
  return symmetric_uniform(1.0 / math.sqrt(fan_in))


def shifted_depthwise_conv(xs: jax.Array, kernel: jax.Array, bias: jax.Array,
                           out_dtype: Any) -> jax.Array:
  """A "valid" depthwise conv1d written as a sum of d_conv shifted products, accumulated in float32.

  xs: [batch, length + d_conv - 1, ch] (the d_conv - 1 inputs before the first output included),
  kernel: [d_conv, 1, ch] (flax's depthwise layout), bias: [ch] -> [batch, length, ch] `out_dtype`.
  out[:, t] = bias + sum_k kernel[k, 0] * xs[:, t + k]

  Why not `lax.conv_general_dilated(feature_group_count=ch)`: its kernel gradient is a convolution
  with batch_group_count = ch, which XLA:CPU expands into a dense ch x ch conv (550 GFLOP for one
  [8, 2048, 2048] bf16 layer, where 4 products per element are needed), and grouped-conv backward
  passes are known to be slow on GPU too (benchmarks/NOTES_layers.md). Here the forward is one
  elementwise fusion and the gradients are shifted sums and per-channel reductions.
  """
  d_conv = kernel.shape[0]
  length = xs.shape[1] - (d_conv - 1)
  if kernel.ndim != 3 or kernel.shape[1] != 1 or kernel.shape[2] != xs.shape[-1] or length < 1:
    raise ValueError(f"shifted_depthwise_conv: kernel must be [d_conv, 1, ch] with ch = xs's last "
                     f"axis and xs must hold at least d_conv tokens; got xs {tuple(xs.shape)}, "
                     f"kernel {tuple(kernel.shape)}")
  f32 = jnp.float32
  acc = bias.astype(f32)
  for k in range(d_conv):
    acc = acc + xs[:, k:k + length].astype(f32) * kernel[k, 0].astype(f32)
  return acc.astype(out_dtype)


class CausalDepthwiseConv1d(nn.Module):
  """The parameters of flax's nn.Conv(ch, (d_conv,), feature_group_count=ch, use_bias=True) (same
  names, shapes and initialisers, so checkpoints and the HF import map unchanged) applied through
  `shifted_depthwise_conv`. Like nn.Conv, kernel and bias are cast to `dtype` before the products.

  xs: [batch, length + d_conv - 1, ch] (already padded or prefixed with cached inputs) ->
  [batch, length, ch] in `dtype`."""

  d_conv: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: jax.Array) -> jax.Array:
    ch = xs.shape[-1]
    init = torch_conv_init(self.d_conv)
    kernel = self.param("kernel", init, (self.d_conv, 1, ch), self.param_dtype)
    bias = self.param("bias", init, (ch,), self.param_dtype)
    return shifted_depthwise_conv(xs.astype(self.dtype), kernel.astype(self.dtype),
                                  bias.astype(self.dtype), self.dtype)


def causal_depthwise_conv(xs: jax.Array, *, d_conv: int, mode: str, cache_conv: jax.Array | None,
                          dtype: Any, param_dtype: Any) -> tuple[jax.Array, jax.Array | None]:
  """The Mamba mixers' causal depthwise conv1d over xs [batch, length, ch], as a submodule named
  "conv1d" of the calling (compact) module. Returns (conv output, the next conv cache or None).

  "full" and "prefill" pad d_conv - 1 zeros on the left ("prefill" also returns the last inputs);
  "decode" reads the cached inputs [batch, d_conv - 1, ch] in place of that padding."""
  conv = CausalDepthwiseConv1d(d_conv, dtype, param_dtype, name="conv1d")
  if mode == "decode":
    new_conv = conv_tail(cache_conv, xs, d_conv)
    return conv(jnp.concatenate([cache_conv.astype(xs.dtype), xs], axis=1)), new_conv
  new_conv = conv_tail(jnp.zeros_like(cache_conv), xs, d_conv) if mode == "prefill" else None
  return conv(jnp.pad(xs, ((0, 0), (d_conv - 1, 0), (0, 0)))), new_conv


class MambaMixer(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model].

  The conv and the scan run across the whole row: packed documents (segment_ids) are not isolated,
  as in the reference Mamba-1 implementation.

  Modes: "full" returns y. "prefill" runs exactly the "full" computation from a zero state and also
  returns the cache after the last token: (y, cache). "decode" continues from `cache` (any number of
  tokens; one in generation): the conv reads the cached inputs instead of zero padding and the scan
  starts from the cached state: (y, cache).
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
  decode_impl: str = "reference"       # one-token decode steps: the plain recurrence is all they need

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
               mode: str = "full") -> Any:
    del segment_ids, positions   # the scan runs across the whole row (see the class docstring)
    if mode not in ("full", "prefill", "decode"):
      raise ValueError(f"mode must be 'full', 'prefill' or 'decode', got {mode!r}")
    if mode != "full" and cache is None:
      raise ValueError(f"mode={mode!r} needs a cache (see init_mamba_cache)")
    d_inner, rank = self.d_inner, self.rank
    dense = lambda feats, name, **kw: nn.Dense(feats, use_bias=False, dtype=self.dtype,
                                               param_dtype=self.param_dtype, name=name, **kw)
    xz = dense(2 * d_inner, "in_proj")(x)
    xs, z = jnp.split(xz, 2, axis=-1)
    xs, new_conv = causal_depthwise_conv(
        xs, d_conv=self.d_conv, mode=mode, cache_conv=None if cache is None else cache["conv"],
        dtype=self.dtype, param_dtype=self.param_dtype)
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
    scan = lambda **kw: ops.selective_scan(xs, delta, -jnp.exp(A_log.astype(jnp.float32)), B, C,
                                           D=D.astype(jnp.float32), z=z,
                                           delta_bias=dt_bias.astype(jnp.float32),
                                           delta_softplus=True, **kw)
    if mode == "full":
      return dense(self.d_model, "out_proj")(scan(impl=self.impl))
    if mode == "prefill":
      y, ssm = scan(impl=self.impl, return_final_state=True)
    else:
      impl = self.decode_impl if xs.shape[1] == 1 else self.impl
      y, ssm = scan(impl=impl, initial_state=cache["ssm"], return_final_state=True)
    return dense(self.d_model, "out_proj")(y), {"conv": new_conv, "ssm": ssm}


# ------------------------------------------------------------------------------------------------
# Registration: pattern letter "M", config group `config.model.mamba`.


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """`config.model.mamba`."""

  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  dt_rank: int = 0             # 0: ceil(d_model / 16), as in Mamba
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  impl: str = "auto"           # ssm_lab.ops.selective_scan impl


def _module(args: Any, cfg: MambaConfig, *, name: str) -> MambaMixer:
  return MambaMixer(d_model=args.d_model, d_state=cfg.d_state, expand=cfg.expand,
                    d_conv=cfg.d_conv, dt_rank=cfg.dt_rank, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
                    dt_init_floor=cfg.dt_init_floor, impl=cfg.impl, dtype=args.compute_dtype,
                    param_dtype=args.params_dtype, name=name)


def _flops(args: Any, cfg: MambaConfig, seq_len: int) -> float:
  """in_proj, conv, x_proj, dt_proj, out_proj; the scan does ~9 FLOPs per (channel, state)
  (discretise, decay, input, output), the count of Gu & Dao (2023, section 3.3)."""
  del seq_len
  d = args.d_model
  di, n = cfg.expand * d, cfg.d_state
  rank = cfg.dt_rank or math.ceil(d / 16)
  return (2 * d * 2 * di + 2 * di * cfg.d_conv + 2 * di * (rank + 2 * n) + 2 * rank * di
          + 9 * di * n + 2 * di * d)


def _init_cache(args: Any, cfg: MambaConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
  del max_len
  return init_mamba_cache(batch, cfg.expand * args.d_model, cfg.d_state, cfg.d_conv,
                          args.compute_dtype)


def _cache_bytes(args: Any, cfg: MambaConfig, context_len: int) -> dict[str, int]:
  """The last d_conv - 1 conv inputs in the compute dtype and the float32 state, at any context."""
  del context_len
  d_inner = cfg.expand * args.d_model
  return {"conv": (cfg.d_conv - 1) * d_inner * np.dtype(args.compute_dtype).itemsize,
          "ssm": 4 * d_inner * cfg.d_state}


def _validate(args: Any, cfg: MambaConfig, prefix: str) -> None:
  del args
  for field in ("d_state", "expand", "d_conv"):
    if getattr(cfg, field) < 1:
      raise ConfigError(f"{prefix}.{field} must be >= 1, got {getattr(cfg, field)}")
  if not 0 < cfg.dt_min <= cfg.dt_max:
    raise ConfigError(f"{prefix}.dt_min={cfg.dt_min} and {prefix}.dt_max={cfg.dt_max} must "
                      f"satisfy 0 < dt_min <= dt_max")


def _from_hf(config: dict[str, Any], t: Any) -> tuple[dict[str, Any], Any]:
  from ssm_lab.models.hf_import import convert_mamba  # noqa: PLC0415 (heavy, only for imports)
  return convert_mamba(config, t, letter="M", group="mamba")


registry.register(registry.MixerSpec(
    letter="M", name="mamba", description="Mamba-1 mixer (selective scan, S6)",
    paper="Gu & Dao 2023, arXiv 2312.00752", config=MambaConfig, module=_module,
    flops_per_token=_flops, init_cache=_init_cache, cache_bytes=_cache_bytes, validate=_validate,
    no_weight_decay=("A_log", "D", "dt_bias"),
    renamed={"d_state": "d_state", "expand": "expand", "d_conv": "d_conv", "dt_rank": "dt_rank",
             "dt_min": "dt_min", "dt_max": "dt_max", "dt_init_floor": "dt_init_floor",
             "scan_impl": "impl"},
    hf_architectures={"MambaForCausalLM": _from_hf}))
