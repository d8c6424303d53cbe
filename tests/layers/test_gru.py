"""The GRU mixer (ssm_lab.layers.gru): the scan against a hand-written NumPy step loop, prefill and
decode, shapes and dtypes, finite gradients, config errors naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab.layers.gru import GRUMixer, init_gru_cache

KEY = jax.random.PRNGKey(0)


def numpy_gru(x, p, hidden):
  """The GRU equations (reset after the recurrent matmul) in float64: x [b, L, d] -> (y, h_L)."""
  sig = lambda a: 1 / (1 + np.exp(-a))
  f = lambda a: np.asarray(a, np.float64)
  w_x, b, w_h = f(p["in_proj"]["kernel"]), f(p["in_proj"]["bias"]), f(p["recurrent_kernel"])
  x = f(x)
  h = np.zeros((x.shape[0], hidden))
  hs = []
  for t in range(x.shape[1]):
    a, g = x[:, t] @ w_x + b, h @ w_h
    part = lambda v, k: v[:, k * hidden:(k + 1) * hidden]
    r, z = sig(part(a, 0) + part(g, 0)), sig(part(a, 1) + part(g, 1))
    n = np.tanh(part(a, 2) + r * part(g, 2))
    h = (1 - z) * n + z * h
    hs.append(h)
  y = np.stack(hs, axis=1)
  if "out_proj" in p:
    y = y @ f(p["out_proj"]["kernel"])
  return y, h


@pytest.mark.parametrize("hidden", [0, 12])
def test_scan_equals_step_loop_and_decode(hidden):
  layer = GRUMixer(d_model=8, hidden=hidden)
  h_dim = hidden or 8
  x = jax.random.normal(KEY, (2, 9, 8))
  params = layer.init(KEY, x)
  y = layer.apply(params, x)
  ref, h = numpy_gru(x, params["params"], h_dim)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  apply = jax.jit(layer.apply, static_argnames=("mode",))
  outs = []
  y4, cache = apply(params, x[:, :4], cache=init_gru_cache(2, h_dim), mode="prefill")
  outs.append(y4)
  for t in range(4, 9):
    yt, cache = apply(params, x[:, t:t + 1], cache=cache, mode="decode")
    outs.append(yt)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), y, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(cache["h"], h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
  layer = GRUMixer(d_model=8, hidden=6, dtype=dtype)
  x = jnp.ones((3, 5, 8), dtype)
  params = layer.init(KEY, x)["params"]
  assert params["in_proj"]["kernel"].shape == (8, 18) and params["recurrent_kernel"].shape == (6, 18)
  y, cache = layer.apply({"params": params}, x, cache=init_gru_cache(3, 6), mode="prefill")
  assert y.shape == x.shape and y.dtype == dtype
  assert cache["h"].shape == (3, 6) and cache["h"].dtype == jnp.float32


def test_gradients_are_finite():
  layer = GRUMixer(d_model=8, hidden=6)
  x = jax.random.normal(KEY, (2, 7, 8))
  params = layer.init(KEY, x)
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1)))(params, x)
  for g in jax.tree_util.tree_leaves(grads):
    assert jnp.all(jnp.isfinite(g)) and jnp.any(g != 0)


def test_config_error_names_the_field():
  config = config_lib.base_config()
  config.task.name = "mqar"
  config.model.pattern = "GA"
  config.model.gru.hidden = -2
  with pytest.raises(config_lib.ConfigError, match="config.model.gru.hidden"):
    config_lib.validate(config)
