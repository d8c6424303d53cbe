"""The LSTM mixer (ssm_lab.layers.lstm): shapes and dtypes, forget-gate bias, the scan against a
hand-written NumPy step loop, prefill/decode state, finite gradients, config errors naming the
field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab.layers.lstm import LSTMMixer, init_lstm_cache

KEY = jax.random.PRNGKey(0)


def numpy_lstm(x, p, hidden):
  """The LSTM equations stepped by hand in float64: x [b, L, d] -> (y [b, L, d], h_L, c_L)."""
  sig = lambda a: 1 / (1 + np.exp(-a))
  w_x, b = np.asarray(p["in_proj"]["kernel"], np.float64), np.asarray(p["in_proj"]["bias"], np.float64)
  w_h = np.asarray(p["recurrent_kernel"], np.float64)
  x = np.asarray(x, np.float64)
  h = np.zeros((x.shape[0], hidden))
  c = np.zeros_like(h)
  hs = []
  for t in range(x.shape[1]):
    a = x[:, t] @ w_x + b + h @ w_h
    i, f, g, o = (a[:, k * hidden:(k + 1) * hidden] for k in range(4))
    c = sig(f) * c + sig(i) * np.tanh(g)
    h = sig(o) * np.tanh(c)
    hs.append(h)
  y = np.stack(hs, axis=1)
  if "out_proj" in p:
    y = y @ np.asarray(p["out_proj"]["kernel"], np.float64)
  return y, h, c


@pytest.mark.parametrize("hidden", [0, 12])
def test_scan_equals_step_loop_and_prefill_decode_state(hidden):
  layer = LSTMMixer(d_model=8, hidden=hidden)
  h_dim = hidden or 8
  x = jax.random.normal(KEY, (2, 9, 8))
  params = layer.init(KEY, x)
  p = params["params"]
  assert ("out_proj" in p) == (hidden not in (0, 8))
  y = layer.apply(params, x)
  ref, h, c = numpy_lstm(x, p, h_dim)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  apply = jax.jit(layer.apply, static_argnames=("mode",))
  y_pre, cache = apply(params, x, cache=init_lstm_cache(2, h_dim), mode="prefill")
  np.testing.assert_allclose(y_pre, y, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(cache["h"], h, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(cache["c"], c, atol=1e-5, rtol=1e-5)
  # Prefill 4 tokens, then decode the rest one at a time: same outputs and final state.
  outs, part = [], init_lstm_cache(2, h_dim)
  y4, part = apply(params, x[:, :4], cache=part, mode="prefill")
  outs.append(y4)
  for t in range(4, 9):
    yt, part = apply(params, x[:, t:t + 1], cache=part, mode="decode")
    outs.append(yt)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), y, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(part["c"], cache["c"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_and_forget_bias(dtype):
  layer = LSTMMixer(d_model=8, hidden=6, dtype=dtype)
  x = jnp.ones((3, 5, 8), dtype)
  params = layer.init(KEY, x)["params"]
  assert params["in_proj"]["kernel"].shape == (8, 24)
  assert params["recurrent_kernel"].shape == (6, 24)
  np.testing.assert_array_equal(params["in_proj"]["bias"],
                                np.r_[np.zeros(6), np.ones(6), np.zeros(12)])
  y, cache = layer.apply({"params": params}, x, cache=init_lstm_cache(3, 6), mode="prefill")
  assert y.shape == x.shape and y.dtype == dtype
  assert cache["h"].shape == cache["c"].shape == (3, 6) and cache["h"].dtype == jnp.float32


def test_gradients_are_finite():
  layer = LSTMMixer(d_model=8, hidden=6)
  x = jax.random.normal(KEY, (2, 7, 8))
  params = layer.init(KEY, x)
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1)))(params, x)
  for g in jax.tree_util.tree_leaves(grads):
    assert jnp.all(jnp.isfinite(g)) and jnp.any(g != 0)


def test_config_error_names_the_field():
  config = config_lib.base_config()
  config.task.name = "mqar"
  config.model.pattern = "LA"
  config.model.lstm.hidden = -1
  with pytest.raises(config_lib.ConfigError, match="config.model.lstm.hidden"):
    config_lib.validate(config)
