"""A GRU mixer (Cho et al. 2014, arXiv 1406.1078): the smaller gated RNN beside the LSTM
(ssm_lab.layers.lstm) in the state-tracking study.

Per token, with gates (r, z, n) of one [.., 3 * hidden] pre-activation from the input (one matmul
over the whole sequence) and one from the state (inside the `lax.scan`),

  [a_r, a_z, a_n] = x_t W_x + b          [g_r, g_z, g_n] = h_{t-1} W_h
  r = sigmoid(a_r + g_r)     z = sigmoid(a_z + g_z)     n = tanh(a_n + r * g_n)
  h_t = (1 - z) * n + z * h_{t-1}

This is the variant that applies the reset gate after the recurrent matmul (as cuDNN does), so the
state's three products are one matmul. The output is h_t, projected back to d_model when
hidden != d_model. Decoding carries {"h": [batch, hidden] float32}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssm_lab.errors import ConfigError
from ssm_lab.layers import registry
from ssm_lab.layers.lstm import recurrent_flops


def gru_cell(gx: jax.Array, gh: jax.Array, h: jax.Array) -> jax.Array:
  """One GRU update from the input and state pre-activations gx, gh [..., 3 * hidden] and the state
  h [..., hidden] (float32); returns the new h."""
  a_r, a_z, a_n = jnp.split(gx, 3, axis=-1)
  g_r, g_z, g_n = jnp.split(gh, 3, axis=-1)
  r, z = jax.nn.sigmoid(a_r + g_r), jax.nn.sigmoid(a_z + g_z)
  n = jnp.tanh(a_n + r * g_n)
  return (1.0 - z) * n + z * h


def init_gru_cache(batch: int, hidden: int) -> dict[str, jax.Array]:
  """An empty decoding cache: h [batch, hidden] float32 zeros."""
  return {"h": jnp.zeros((batch, hidden), jnp.float32)}


class GRUMixer(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model]. The recurrence runs across the whole
  row. Modes as the LSTM mixer's: "full" -> y; "prefill" -> (y, cache) from a zero state; "decode"
  -> (y, cache) continuing from `cache`."""

  d_model: int
  hidden: int = 0                      # 0: d_model
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
               mode: str = "full") -> Any:
    del segment_ids, positions   # the recurrence runs across the whole row
    if mode not in ("full", "prefill", "decode"):
      raise ValueError(f"mode must be 'full', 'prefill' or 'decode', got {mode!r}")
    if mode == "decode" and cache is None:
      raise ValueError("mode='decode' needs a cache (see init_gru_cache)")
    h_dim = self.hidden or self.d_model
    gates_x = nn.Dense(3 * h_dim, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="in_proj")(x)
    w_h = self.param("recurrent_kernel", nn.initializers.orthogonal(), (h_dim, 3 * h_dim),
                     self.param_dtype).astype(self.dtype)
    h0 = cache["h"] if mode == "decode" else jnp.zeros((x.shape[0], h_dim), jnp.float32)

    def step(h, gx):
      gh = jnp.dot(h.astype(self.dtype), w_h, preferred_element_type=jnp.float32)
      h = gru_cell(gx.astype(jnp.float32), gh, h)
      return h, h

    h_last, hs = jax.lax.scan(step, h0, jnp.moveaxis(gates_x, 1, 0))
    y = jnp.moveaxis(hs, 0, 1).astype(self.dtype)
    if h_dim != self.d_model:
      y = nn.Dense(self.d_model, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="out_proj")(y)
    return y if mode == "full" else (y, {"h": h_last})


# ------------------------------------------------------------------------------------------------
# Registration: pattern letter "G", config group `config.model.gru`.


@dataclasses.dataclass(frozen=True)
class GRUConfig:
  """`config.model.gru`."""

  hidden: int = 0              # state size; 0: d_model (no output projection then)


def _module(args: Any, cfg: GRUConfig, *, name: str) -> GRUMixer:
  return GRUMixer(d_model=args.d_model, hidden=cfg.hidden, dtype=args.compute_dtype,
                  param_dtype=args.params_dtype, name=name)


def _flops(args: Any, cfg: GRUConfig, seq_len: int) -> float:
  del seq_len
  return recurrent_flops(args.d_model, cfg.hidden or args.d_model, gates=3)


def _init_cache(args: Any, cfg: GRUConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
  del max_len
  return init_gru_cache(batch, cfg.hidden or args.d_model)


def _cache_bytes(args: Any, cfg: GRUConfig, context_len: int) -> dict[str, int]:
  """h in float32, at any context."""
  del context_len
  return {"state": 4 * (cfg.hidden or args.d_model)}


def _validate(args: Any, cfg: GRUConfig, prefix: str) -> None:
  del args
  if cfg.hidden < 0:
    raise ConfigError(f"{prefix}.hidden must be >= 0 (0: d_model), got {cfg.hidden}")


registry.register(registry.MixerSpec(
    letter="G", name="gru", description="GRU (single layer, lax.scan)",
    paper="Cho et al. 2014, arXiv 1406.1078", config=GRUConfig, module=_module,
    flops_per_token=_flops, init_cache=_init_cache, cache_bytes=_cache_bytes, validate=_validate))
