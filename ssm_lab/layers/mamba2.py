"""The Mamba-2 mixer (Dao & Gu 2024) with the official parameterisation and initialisation.

  x -> in_proj -> (z, xBC, dt);  xBC -> causal depthwise conv1d -> silu -> (x, B, C)
  y = ssd(x, dt, A, B, C, D, dt_bias, softplus)      A = -exp(A_log), one scalar per head
  y = rmsnorm_per_group(y * silu(z)) * scale -> out_proj

Parameter names follow Hugging Face's Mamba2Mixer, so a checkpoint maps one to one: in_proj/kernel
(= in_proj.weight^T, output features ordered [z, x, B, C, dt]), conv1d/kernel [d_conv, 1, conv_dim]
(= conv1d.weight [conv_dim, 1, d_conv] transposed), conv1d/bias, dt_bias, A_log, D, norm/scale
(= norm.weight), out_proj/kernel.

Decoding carries a constant-size cache {"conv": [batch, d_conv - 1, conv_dim] (the last conv inputs),
"ssm": [batch, heads, head_dim, d_state] float32}, conv_dim = d_inner + 2 * n_groups * d_state.
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
from ssm_lab.layers.mamba import causal_depthwise_conv, dt_bias_init


def a_log_init(key, shape, dtype=jnp.float32):
  """A_log = log(U[1, 16]) per head (Mamba-2's A_init_range), so A = -exp(A_log) in [-16, -1]."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def init_mamba2_cache(batch: int, *, d_inner: int, d_state: int, head_dim: int, n_groups: int,
                      d_conv: int, dtype: Any) -> dict[str, jax.Array]:
  """An empty decoding cache: conv [batch, d_conv - 1, d_inner + 2 * n_groups * d_state] (`dtype`),
  ssm [batch, d_inner // head_dim, head_dim, d_state] float32, both zeros."""
  return {"conv": jnp.zeros((batch, d_conv - 1, d_inner + 2 * n_groups * d_state), dtype),
          "ssm": jnp.zeros((batch, d_inner // head_dim, head_dim, d_state), jnp.float32)}


def mamba2_flops_per_token(d_model: int, d_state: int, head_dim: int, expand: int, n_groups: int,
                           d_conv: int, chunk_size: int) -> float:
  """Forward FLOPs per token of `Mamba2Mixer` (2 per multiply-add), as the chunked SSD computes them.

  Counted: in_proj, the depthwise conv, the SSD products (per chunk of Q tokens: C B^T per group,
  Q x Q by Q x head_dim per head, the chunk state and the state read-out, each head_dim x d_state
  per token and head) and out_proj. Not counted: element-wise work (decays, gates, norm, softplus).
  """
  d_inner = expand * d_model
  heads = d_inner // head_dim
  gn = n_groups * d_state
  in_proj = 2 * d_model * (2 * d_inner + 2 * gn + heads)
  conv = 2 * d_conv * (d_inner + 2 * gn)
  ssd = 2 * chunk_size * gn + 2 * chunk_size * d_inner + 2 * 2 * d_inner * d_state
  out_proj = 2 * d_inner * d_model
  return float(in_proj + conv + ssd + out_proj)


class GatedRMSNorm(nn.Module):
  """rmsnorm(y * silu(z)) * scale, the RMS taken over each of `n_groups` equal channel groups: Mamba-2
  gates first, then normalises per group. y, z: [..., d_inner] -> [..., d_inner] in `dtype`."""

  n_groups: int = 1
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
    d = y.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    hg = h.reshape(*h.shape[:-1], self.n_groups, d // self.n_groups)
    hg = hg * jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + self.eps)
    return (hg.reshape(h.shape) * scale.astype(jnp.float32)).astype(self.dtype)


class Mamba2Mixer(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model].

  `segment_ids` is ignored: the conv and the state run across the whole row, so packed documents
  are not isolated (as in the reference Mamba-2 without its cu_seqlens path).

  Modes: "full" returns y. "prefill" runs exactly the "full" computation from a zero state and also
  returns the cache after the last token: (y, cache). "decode" continues from `cache` (any number of
  tokens; one in generation): the conv reads the cached inputs instead of zero padding and the SSD
  starts from the cached state: (y, cache).
  """

  d_model: int
  d_state: int = 64
  head_dim: int = 64
  expand: int = 2
  n_groups: int = 1
  d_conv: int = 4
  chunk_size: int = 64
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  norm_eps: float = 1e-5
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32        # compute dtype
  param_dtype: jnp.dtype = jnp.float32
  decode_impl: str = "reference"        # one-token decode steps: the plain recurrence is all they need

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def heads(self) -> int:
    return self.d_inner // self.head_dim

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
               mode: str = "full") -> Any:
    del segment_ids, positions   # the state runs across the whole row (see the class docstring)
    d_inner, heads, gn = self.d_inner, self.heads, self.n_groups * self.d_state
    if d_inner % self.head_dim:
      raise ValueError(f"Mamba2Mixer: d_inner = expand * d_model = {d_inner} must be a multiple of "
                       f"head_dim={self.head_dim}")
    if heads % self.n_groups:
      raise ValueError(f"Mamba2Mixer: n_groups={self.n_groups} must divide heads = d_inner / "
                       f"head_dim = {heads}")
    if mode not in ("full", "prefill", "decode"):
      raise ValueError(f"mode must be 'full', 'prefill' or 'decode', got {mode!r}")
    if mode != "full" and cache is None:
      raise ValueError(f"mode={mode!r} needs a cache (see init_mamba2_cache)")
    batch, length, _ = x.shape
    conv_dim = d_inner + 2 * gn
    dense = lambda feats, name: nn.Dense(feats, use_bias=False, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)

    zxbcdt = dense(2 * d_inner + 2 * gn + heads, "in_proj")(x)
    z, xbc, dt = jnp.split(zxbcdt, [d_inner, d_inner + conv_dim], axis=-1)
    xbc, new_conv = causal_depthwise_conv(
        xbc, d_conv=self.d_conv, mode=mode, cache_conv=None if cache is None else cache["conv"],
        dtype=self.dtype, param_dtype=self.param_dtype)
    xbc = jax.nn.silu(xbc)
    xs, B, C = jnp.split(xbc, [d_inner, d_inner + gn], axis=-1)
    xs = xs.reshape(batch, length, heads, self.head_dim)
    B = B.reshape(batch, length, self.n_groups, self.d_state)
    C = C.reshape(batch, length, self.n_groups, self.d_state)

    dt_bias = self.param("dt_bias", dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                         (heads,), self.param_dtype)
    A_log = self.param("A_log", a_log_init, (heads,), self.param_dtype)
    D = self.param("D", nn.initializers.ones, (heads,), self.param_dtype)
    A = -jnp.exp(A_log.astype(jnp.float32))
    ssd = lambda **kw: ops.ssd(xs, dt, A, B, C, D=D.astype(jnp.float32),
                               dt_bias=dt_bias.astype(jnp.float32), dt_softplus=True,
                               chunk_size=self.chunk_size, **kw)
    ssm = None
    if mode == "full":
      y = ssd(impl=self.impl)
    elif mode == "prefill":
      y, ssm = ssd(impl=self.impl, return_final_state=True)
    else:
      impl = self.decode_impl if length == 1 else self.impl
      y, ssm = ssd(impl=impl, initial_state=cache["ssm"], return_final_state=True)

    y = GatedRMSNorm(self.n_groups, self.norm_eps, self.dtype, self.param_dtype,
                     name="norm")(y.reshape(batch, length, d_inner), z)
    out = dense(self.d_model, "out_proj")(y)
    return out if mode == "full" else (out, {"conv": new_conv, "ssm": ssm})


# ------------------------------------------------------------------------------------------------
# Registration: pattern letter "S", config group `config.model.mamba2`.


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """`config.model.mamba2`."""

  d_state: int = 64
  head_dim: int = 64
  n_groups: int = 1
  chunk_size: int = 64
  expand: int = 2
  d_conv: int = 4
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  impl: str = "auto"           # ssm_lab.ops.ssd impl


def _module(args: Any, cfg: Mamba2Config, *, name: str) -> Mamba2Mixer:
  return Mamba2Mixer(d_model=args.d_model, d_state=cfg.d_state, head_dim=cfg.head_dim,
                     expand=cfg.expand, n_groups=cfg.n_groups, d_conv=cfg.d_conv,
                     chunk_size=cfg.chunk_size, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
                     dt_init_floor=cfg.dt_init_floor, norm_eps=args.norm_eps, impl=cfg.impl,
                     dtype=args.compute_dtype, param_dtype=args.params_dtype, name=name)


def _flops(args: Any, cfg: Mamba2Config, seq_len: int) -> float:
  del seq_len
  return mamba2_flops_per_token(args.d_model, cfg.d_state, cfg.head_dim, cfg.expand, cfg.n_groups,
                                cfg.d_conv, cfg.chunk_size)


def _init_cache(args: Any, cfg: Mamba2Config, batch: int, max_len: int) -> dict[str, jax.Array]:
  del max_len
  return init_mamba2_cache(batch, d_inner=cfg.expand * args.d_model, d_state=cfg.d_state,
                           head_dim=cfg.head_dim, n_groups=cfg.n_groups, d_conv=cfg.d_conv,
                           dtype=args.compute_dtype)


def _cache_bytes(args: Any, cfg: Mamba2Config, context_len: int) -> dict[str, int]:
  """The last d_conv - 1 inputs of x, B and C, and the float32 state (heads * head_dim = d_inner)."""
  del context_len
  d_inner = cfg.expand * args.d_model
  conv_dim = d_inner + 2 * cfg.n_groups * cfg.d_state
  return {"conv": (cfg.d_conv - 1) * conv_dim * np.dtype(args.compute_dtype).itemsize,
          "ssm": 4 * d_inner * cfg.d_state}


def _validate(args: Any, cfg: Mamba2Config, prefix: str) -> None:
  for field in ("d_state", "head_dim", "n_groups", "chunk_size", "expand", "d_conv"):
    if getattr(cfg, field) < 1:
      raise ConfigError(f"{prefix}.{field} must be >= 1, got {getattr(cfg, field)}")
  d_inner = cfg.expand * args.d_model
  if d_inner % cfg.head_dim:
    raise ConfigError(f"{prefix}.head_dim={cfg.head_dim} must divide {prefix}.expand * "
                      f"config.model.d_model = {d_inner}")
  if (d_inner // cfg.head_dim) % cfg.n_groups:
    raise ConfigError(f"{prefix}.n_groups={cfg.n_groups} must divide the number of heads "
                      f"{d_inner // cfg.head_dim}")


def _from_hf(config: dict[str, Any], t: Any) -> tuple[dict[str, Any], Any]:
  from ssm_lab.models.hf_import import convert_mamba2  # noqa: PLC0415 (heavy, only for imports)
  return convert_mamba2(config, t, letter="S", group="mamba2")


registry.register(registry.MixerSpec(
    letter="S", name="mamba2", description="Mamba-2 mixer (SSD)",
    paper="Dao & Gu 2024, arXiv 2405.21060", config=Mamba2Config, module=_module,
    flops_per_token=_flops, init_cache=_init_cache, cache_bytes=_cache_bytes, validate=_validate,
    no_weight_decay=("A_log", "D", "dt_bias"),
    renamed={"ssd_d_state": "d_state", "ssd_head_dim": "head_dim", "ssd_n_groups": "n_groups",
             "ssd_chunk_size": "chunk_size", "ssd_impl": "impl", "expand": "expand",
             "d_conv": "d_conv", "dt_min": "dt_min", "dt_max": "dt_max",
             "dt_init_floor": "dt_init_floor"},
    hf_architectures={"Mamba2ForCausalLM": _from_hf}))
