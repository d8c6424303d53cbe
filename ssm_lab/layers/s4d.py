"""An S4D mixer: Mamba-1's block around a linear time-invariant (non-selective) diagonal SSM.

The SSM is S4D-Real (Gu, Goel, Gupta & Ré 2022, "On the Parameterization and Initialization of
Diagonal State Space Models", arXiv 2206.11893): per channel c and state n,

  h_t[c, n] = exp(delta_c A[c, n]) h_{t-1}[c, n] + delta_c B[c, n] u_t[c]
  y_t[c]    = sum_n C[c, n] h_t[c, n] + D_c u_t[c]

with A = -exp(A_log) (A_log = log(1..N): S4D-Real's A[:, n] = -(n + 1)), delta_c = exp(log_dt_c)
(log-uniform in [dt_min, dt_max]) and B, C learned [d_inner, d_state] parameters, none of them
functions of the input. The input term delta * B * u is Mamba's simplified discretisation, so with
constant delta, B and C this is exactly `ssm_lab.ops.selective_scan`'s recurrence: the S4 rows of
Gu & Dao 2023 (arXiv 2312.00752, Table 1: the "No gate" S4 layer, and Mamba's block with S4).

The block (as Mamba's): x -> in_proj -> (x, z); x -> causal depthwise conv -> silu -> SSM;
y * silu(z) -> out_proj. `gate=False` drops z (the "No gate" architecture); `conv=False` drops the
conv and its silu (the SSM then reads the projection directly, as an S4 layer does).

Because the system is time-invariant, the whole sequence is one causal convolution with the kernel

  K[c, t] = delta_c sum_n C[c, n] B[c, n] exp(delta_c A[c, n])^t          t = 0 .. L - 1

computed by FFT over 2L points (impl "fft", the default: O(L log L) per channel, no
[L, d_inner, d_state] tensor of states); impl "scan" runs the recurrence through
`ssm_lab.ops.selective_scan` instead, with B and C broadcast to one group per channel. On the CPU
`causal_conv` runs the same convolution directly (O(L^2) per channel): there XLA runs independent
FFTs at once on its thread pool and each waits for pool threads the others hold, a deadlock that
stopped our 2-core CPU runs at random steps with every thread idle (the same wedge as
PyAutoLabs/PyAutoFit#1530; `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` also avoids it, at the
cost of single-threaded CPU matmuls). Decoding always steps the recurrence from the
cache {"conv": [batch, d_conv - 1, d_inner] (only with conv), "ssm": [batch, d_inner, d_state]
float32}, constant in the context length.
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
from ssm_lab.layers.mamba import a_log_init, causal_depthwise_conv

IMPLS = ("auto", "fft", "scan")


def log_dt_init(dt_min: float, dt_max: float):
  """log(delta) uniform in [log dt_min, log dt_max] (S4D's timescale init)."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    return (u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).astype(dtype)
  return init


def causal_conv(u: jax.Array, kernel: jax.Array) -> jax.Array:
  """The causal long convolution of `causal_fft_conv` (same arguments and result): by FFT on
  accelerators, directly on the CPU (O(L^2) per channel, one depthwise convolution), where XLA's
  concurrent FFTs can deadlock its thread pool (see the module docstring). S4D and Hyena call this."""
  if jax.default_backend() != "cpu":
    return causal_fft_conv(u, kernel)
  length, ch = u.shape[1], u.shape[2]
  if kernel.shape != (length, ch):
    raise ValueError(f"causal_conv: kernel must be [length, ch] = {(length, ch)}, got "
                     f"{tuple(kernel.shape)}")
  # Cross-correlation with the flipped kernel, left-padded: y[t] = sum_s kernel[t - s] u[s].
  rhs = kernel.astype(jnp.float32)[::-1, None, :]                      # [length, 1, ch]  (WIO)
  return jax.lax.conv_general_dilated(u.astype(jnp.float32), rhs, window_strides=(1,),
                                      padding=[(length - 1, 0)], dimension_numbers=("NWC", "WIO", "NWC"),
                                      feature_group_count=ch)


def causal_fft_conv(u: jax.Array, kernel: jax.Array) -> jax.Array:
  """y[:, t, c] = sum_{s <= t} kernel[t - s, c] u[:, s, c], by FFT over 2L points in float32.

  u: [batch, length, ch]; kernel: [length, ch] -> [batch, length, ch] float32. Zero-padding to 2L
  makes the FFT's circular convolution a linear (so causal) one.
  """
  length = u.shape[1]
  if kernel.shape != (length, u.shape[2]):
    raise ValueError(f"causal_fft_conv: kernel must be [length, ch] = {(length, u.shape[2])}, got "
                     f"{tuple(kernel.shape)}")
  n = 2 * length
  uf = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)
  kf = jnp.fft.rfft(kernel.astype(jnp.float32), n=n, axis=0)
  return jnp.fft.irfft(uf * kf[None], n=n, axis=1)[:, :length]


def s4d_powers(dt: jax.Array, A: jax.Array, length: int) -> jax.Array:
  """exp(dt_c A[c, n] t) for t = 0 .. length - 1: [d_inner, d_state, length] float32. A < 0, so
  late powers underflow to 0 rather than overflow."""
  t = jnp.arange(length, dtype=jnp.float32)
  return jnp.exp((dt[:, None] * A)[..., None] * t)


def s4d_kernel(dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, length: int) -> jax.Array:
  """The SSM's impulse response K [length, d_inner] (see the module docstring); dt [d_inner],
  A, B, C [d_inner, d_state]."""
  powers = s4d_powers(dt, A, length)
  return jnp.einsum("cn,cnt->tc", C * B * dt[:, None], powers)


class S4DMixer(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model].

  Like the Mamba mixer, the conv and the SSM run across the whole row (segment_ids are not
  isolated). Modes: "full" returns y; "prefill" runs the "full" computation from a zero state and
  also returns the cache after the last token; "decode" continues from `cache` (any number of
  tokens) with the recurrence.
  """

  d_model: int
  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  conv: bool = True
  gate: bool = True
  dt_min: float = 0.001
  dt_max: float = 0.1
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
               mode: str = "full") -> Any:
    del segment_ids, positions   # the SSM runs across the whole row (see the class docstring)
    if mode not in ("full", "prefill", "decode"):
      raise ValueError(f"mode must be 'full', 'prefill' or 'decode', got {mode!r}")
    if mode != "full" and cache is None:
      raise ValueError(f"mode={mode!r} needs a cache (see init_s4d_cache)")
    if self.impl not in IMPLS:
      raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
    d_inner, n = self.d_inner, self.d_state
    dense = lambda feats, name: nn.Dense(feats, use_bias=False, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    xz = dense((2 if self.gate else 1) * d_inner, "in_proj")(x)
    xs, z = jnp.split(xz, 2, axis=-1) if self.gate else (xz, None)
    new_cache: dict[str, jax.Array] = {}
    if self.conv:
      xs, new_conv = causal_depthwise_conv(
          xs, d_conv=self.d_conv, mode=mode, cache_conv=None if cache is None else cache["conv"],
          dtype=self.dtype, param_dtype=self.param_dtype)
      xs = jax.nn.silu(xs)
      if new_conv is not None:
        new_cache["conv"] = new_conv
    f32 = jnp.float32
    log_dt = self.param("log_dt", log_dt_init(self.dt_min, self.dt_max), (d_inner,),
                        self.param_dtype)
    A_log = self.param("A_log", a_log_init, (d_inner, n), self.param_dtype)
    # S4D: B = 1 and C ~ N(0, 1) (the real part of its complex normal init).
    B = self.param("B", nn.initializers.ones, (d_inner, n), self.param_dtype)
    C = self.param("C", nn.initializers.normal(1.0), (d_inner, n), self.param_dtype)
    D = self.param("D", nn.initializers.ones, (d_inner,), self.param_dtype)
    dt, A = jnp.exp(log_dt.astype(f32)), -jnp.exp(A_log.astype(f32))
    B, C, D = B.astype(f32), C.astype(f32), D.astype(f32)
    batch, length, _ = xs.shape

    def scan(impl: str, initial_state: jax.Array | None) -> Any:
      # One group per channel: B, C broadcast to [batch, length, d_inner, d_state] (no copy until
      # the op materialises them); delta broadcast to [batch, length, d_inner].
      bc = lambda m: jnp.broadcast_to(m, (batch, length, d_inner, n))
      return ops.selective_scan(xs, jnp.broadcast_to(dt, xs.shape), A, bc(B), bc(C), D=D, z=z,
                                initial_state=initial_state, return_final_state=mode != "full",
                                impl=impl)

    if mode == "decode":
      y, new_cache["ssm"] = scan("reference" if length == 1 else "auto", cache["ssm"])
    elif self.impl == "scan":
      out = scan("auto", None)
      y = out if mode == "full" else out[0]
      if mode == "prefill":
        new_cache["ssm"] = out[1]
    else:
      u = xs.astype(f32)
      powers = s4d_powers(dt, A, length)
      kernel = jnp.einsum("cn,cnt->tc", C * B * dt[:, None], powers)
      y = causal_conv(u, kernel) + u * D
      if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
      y = y.astype(xs.dtype)
      if mode == "prefill":
        # The state after the last token in closed form:
        # h_{L-1}[c, n] = sum_s exp(dt_c A[c, n])^(L-1-s) dt_c B[c, n] u_s[c].
        new_cache["ssm"] = jnp.einsum("blc,cnl->bcn", u, (dt[:, None] * B)[..., None]
                                      * powers[..., ::-1])
    y = dense(self.d_model, "out_proj")(y)
    return y if mode == "full" else (y, new_cache)


def init_s4d_cache(batch: int, d_inner: int, d_state: int, d_conv: int, conv: bool,
                   dtype: Any) -> dict[str, jax.Array]:
  """An empty decoding cache: ssm [batch, d_inner, d_state] float32 and, with the conv, its last
  inputs conv [batch, d_conv - 1, d_inner] (`dtype`); zeros (the state before the first token)."""
  out = {"ssm": jnp.zeros((batch, d_inner, d_state), jnp.float32)}
  if conv:
    out["conv"] = jnp.zeros((batch, d_conv - 1, d_inner), dtype)
  return out


# ------------------------------------------------------------------------------------------------
# Registration: pattern letter "D", config group `config.model.s4d`.


@dataclasses.dataclass(frozen=True)
class S4DConfig:
  """`config.model.s4d`."""

  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  conv: bool = True            # the causal depthwise conv (+ silu) before the SSM, as in Mamba
  gate: bool = True            # y * silu(z); False: the "No gate" S4 of Gu & Dao 2023, Table 1
  dt_min: float = 0.001
  dt_max: float = 0.1
  impl: str = "auto"           # "fft" (auto; direct on the CPU) or "scan" (ssm_lab.ops.selective_scan)


def _module(args: Any, cfg: S4DConfig, *, name: str) -> S4DMixer:
  return S4DMixer(d_model=args.d_model, d_state=cfg.d_state, expand=cfg.expand, d_conv=cfg.d_conv,
                  conv=cfg.conv, gate=cfg.gate, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
                  impl=cfg.impl, dtype=args.compute_dtype, param_dtype=args.params_dtype,
                  name=name)


def _flops(args: Any, cfg: S4DConfig, seq_len: int) -> float:
  """Projections and conv, plus the SSM: with FFT, the kernel (2 per channel and state) and three
  real FFTs of 2L points (~2.5 * 2L log2(2L) each, per channel per sequence) and the spectral
  product; with the scan, Mamba's ~9 per channel and state."""
  d = args.d_model
  di, n = cfg.expand * d, cfg.d_state
  proj = 2 * d * (2 if cfg.gate else 1) * di + 2 * di * d + (2 * di * cfg.d_conv if cfg.conv else 0)
  if cfg.impl == "scan":
    ssm = 9 * di * n
  else:
    ssm = di * (2 * n + 15 * math.log2(2 * max(seq_len, 1)) + 6)
  return proj + ssm


def _init_cache(args: Any, cfg: S4DConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
  del max_len
  return init_s4d_cache(batch, cfg.expand * args.d_model, cfg.d_state, cfg.d_conv, cfg.conv,
                        args.compute_dtype)


def _cache_bytes(args: Any, cfg: S4DConfig, context_len: int) -> dict[str, int]:
  """The last d_conv - 1 conv inputs (with the conv) and the float32 state, at any context."""
  del context_len
  di = cfg.expand * args.d_model
  conv = (cfg.d_conv - 1) * di * np.dtype(args.compute_dtype).itemsize if cfg.conv else 0
  return {"conv": conv, "ssm": 4 * di * cfg.d_state}


def _validate(args: Any, cfg: S4DConfig, prefix: str) -> None:
  del args
  for field in ("d_state", "expand", "d_conv"):
    if getattr(cfg, field) < 1:
      raise ConfigError(f"{prefix}.{field} must be >= 1, got {getattr(cfg, field)}")
  if not 0 < cfg.dt_min <= cfg.dt_max:
    raise ConfigError(f"{prefix}.dt_min={cfg.dt_min} and {prefix}.dt_max={cfg.dt_max} must "
                      f"satisfy 0 < dt_min <= dt_max")
  if cfg.impl not in IMPLS:
    raise ConfigError(f"{prefix}.impl={cfg.impl!r} must be one of {list(IMPLS)}")


registry.register(registry.MixerSpec(
    letter="D", name="s4d", description="S4D mixer (LTI diagonal SSM in Mamba's block)",
    paper="Gu, Goel, Gupta & Ré 2022, arXiv 2206.11893; Gu & Dao 2023 Table 1",
    config=S4DConfig, module=_module, flops_per_token=_flops, init_cache=_init_cache,
    cache_bytes=_cache_bytes, validate=_validate, no_weight_decay=("A_log", "B")))
