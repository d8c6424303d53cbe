"""An LSTM mixer (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000): the
non-linear recurrent baseline of the state-tracking study.

Per token, with gates in the order (i, f, g, o) of one [.., 4 * hidden] pre-activation,

  [i, f, g, o] = x_t W_x + b + h_{t-1} W_h
  c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
  h_t = sigmoid(o) * tanh(c_t)

and the block's output is h_t (projected back to d_model when hidden != d_model). The input part
x W_x + b is one matmul over the whole sequence; only h W_h runs inside the `lax.scan`. The
forget-gate bias starts at 1.0 (Gers et al. 2000; Jozefowicz et al. 2015) so early training keeps
memory. Unlike the diagonal linear SSMs, the state update is non-linear and dense, which is why a
one-layer RNN can track the state of S5 (permutation composition) where SSMs and Transformers of
fixed depth cannot (Merrill, Petty & Sabharwal 2024, arXiv 2404.08819).

Decoding carries {"h", "c"}: [batch, hidden] float32, constant in the context length.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssm_lab.errors import ConfigError
from ssm_lab.layers import registry


def lstm_bias_init(hidden: int, forget_bias: float):
  """Zeros except the forget gate's slice [hidden, 2 * hidden), set to `forget_bias`."""

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(forget_bias)
  return init


def lstm_cell(gates: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One LSTM update from the pre-activations gates [..., 4 * hidden] and c [..., hidden] (float32);
  returns (h, c)."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def init_lstm_cache(batch: int, hidden: int) -> dict[str, jax.Array]:
  """An empty decoding cache: h, c [batch, hidden] float32 zeros (the state before the first token)."""
  return {"h": jnp.zeros((batch, hidden), jnp.float32), "c": jnp.zeros((batch, hidden), jnp.float32)}


class LSTMMixer(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model].

  The recurrence runs across the whole row (packed documents are not isolated, as in the SSM
  mixers). Modes: "full" returns y; "prefill" runs the "full" computation from a zero state and also
  returns the cache after the last token; "decode" continues from `cache` (any number of tokens).
  """

  d_model: int
  hidden: int = 0                      # 0: d_model
  forget_bias: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def hidden_size(self) -> int:
    return self.hidden or self.d_model

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
               mode: str = "full") -> Any:
    del segment_ids, positions   # the recurrence runs across the whole row
    if mode not in ("full", "prefill", "decode"):
      raise ValueError(f"mode must be 'full', 'prefill' or 'decode', got {mode!r}")
    if mode == "decode" and cache is None:
      raise ValueError("mode='decode' needs a cache (see init_lstm_cache)")
    h_dim = self.hidden_size
    gates_x = nn.Dense(4 * h_dim, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                       bias_init=lstm_bias_init(h_dim, self.forget_bias), name="in_proj")(x)
    w_h = self.param("recurrent_kernel", nn.initializers.orthogonal(), (h_dim, 4 * h_dim),
                     self.param_dtype).astype(self.dtype)
    batch = x.shape[0]
    if mode == "decode":
      h0, c0 = cache["h"], cache["c"]
    else:
      h0 = c0 = jnp.zeros((batch, h_dim), jnp.float32)

    def step(carry, gx):
      h, c = carry
      # The recurrent matmul in the compute dtype, accumulated and carried in float32.
      gates = gx.astype(jnp.float32) + jnp.dot(h.astype(self.dtype), w_h,
                                               preferred_element_type=jnp.float32)
      h, c = lstm_cell(gates, c)
      return (h, c), h

    (h_last, c_last), hs = jax.lax.scan(step, (h0, c0), jnp.moveaxis(gates_x, 1, 0))
    y = jnp.moveaxis(hs, 0, 1).astype(self.dtype)
    if h_dim != self.d_model:
      y = nn.Dense(self.d_model, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="out_proj")(y)
    return y if mode == "full" else (y, {"h": h_last, "c": c_last})


# ------------------------------------------------------------------------------------------------
# Registration: pattern letter "L", config group `config.model.lstm`.


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  """`config.model.lstm`."""

  hidden: int = 0              # state size; 0: d_model (no output projection then)
  forget_bias: float = 1.0     # initial forget-gate bias


def _module(args: Any, cfg: LSTMConfig, *, name: str) -> LSTMMixer:
  return LSTMMixer(d_model=args.d_model, hidden=cfg.hidden, forget_bias=cfg.forget_bias,
                   dtype=args.compute_dtype, param_dtype=args.params_dtype, name=name)


def recurrent_flops(d_model: int, hidden: int, gates: int) -> float:
  """Forward FLOPs per token of a gated RNN layer: the input and recurrent matmuls of `gates` gates,
  plus the output projection when hidden != d_model."""
  d, h = d_model, hidden
  return 2 * d * gates * h + 2 * h * gates * h + (2 * h * d if h != d else 0)


def _flops(args: Any, cfg: LSTMConfig, seq_len: int) -> float:
  del seq_len
  return recurrent_flops(args.d_model, cfg.hidden or args.d_model, gates=4)


def _init_cache(args: Any, cfg: LSTMConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
  del max_len
  return init_lstm_cache(batch, cfg.hidden or args.d_model)


def _cache_bytes(args: Any, cfg: LSTMConfig, context_len: int) -> dict[str, int]:
  """h and c in float32, at any context."""
  del context_len
  return {"state": 2 * 4 * (cfg.hidden or args.d_model)}


def _validate(args: Any, cfg: LSTMConfig, prefix: str) -> None:
  del args
  if cfg.hidden < 0:
    raise ConfigError(f"{prefix}.hidden must be >= 0 (0: d_model), got {cfg.hidden}")


registry.register(registry.MixerSpec(
    letter="L", name="lstm", description="LSTM (single layer, lax.scan)",
    paper="Hochreiter & Schmidhuber 1997; forget gate: Gers et al. 2000",
    config=LSTMConfig, module=_module, flops_per_token=_flops, init_cache=_init_cache,
    cache_bytes=_cache_bytes, validate=_validate))
