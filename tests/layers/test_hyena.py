"""The Hyena mixer (ssm_lab.layers.hyena): shapes and dtypes, the mixer's FFT long convolution
against a direct causal convolution written out in NumPy, a filter independent of the call's
length, prefill + decode against the full pass, finite gradients, config errors naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab.layers.hyena import HyenaMixer, ImplicitFilter, init_hyena_cache

KEY = jax.random.PRNGKey(0)
D_MODEL, D_CONV = 8, 3


def small_layer(**kw):
  return HyenaMixer(d_model=D_MODEL, d_conv=D_CONV, filter_width=16, **kw)


def test_mixer_equals_direct_causal_convolution():
  layer = small_layer()
  x = jax.random.normal(KEY, (2, 12, D_MODEL))
  params = layer.init(KEY, x)
  p = params["params"]
  y = layer.apply(params, x)
  # The same block written out: projections, short conv, then y_t = q_t * sum_{s<=t} h[t-s] u_s.
  f = lambda a: np.asarray(a, np.float64)
  qkv = f(x) @ f(p["in_proj"]["kernel"])
  pad = np.pad(qkv, ((0, 0), (D_CONV - 1, 0), (0, 0)))
  k_conv = f(p["conv1d"]["kernel"])[:, 0]
  qkv = sum(pad[:, i:i + 12] * k_conv[i] for i in range(D_CONV)) + f(p["conv1d"]["bias"])
  q, k, v = np.split(qkv, 3, axis=-1)
  u = k * v
  h = f(ImplicitFilter(D_MODEL, width=16).apply({"params": p["filter"]}, 12))
  conv = np.zeros_like(u)
  for t in range(12):
    for s in range(t + 1):
      conv[:, t] += h[t - s] * u[:, s]
  ref = (q * (conv + f(p["D"]) * u)) @ f(p["out_proj"]["kernel"])
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-4)


def test_filter_does_not_depend_on_the_length_and_decays():
  filt = ImplicitFilter(4, width=8)
  params = filt.init(KEY, 5)
  short, long_ = filt.apply(params, 5), filt.apply(params, 300)
  np.testing.assert_allclose(long_[:5], short, atol=1e-6)
  # The fastest channel's window (rate 0.5) leaves nothing at lag 299 (exp(-150)); the MLP's output
  # is bounded, so the window decides.
  assert abs(float(long_[-1, -1])) < 1e-30


def test_prefill_then_decode_equals_full_and_history_holds_k_times_v():
  layer = small_layer()
  x = jax.random.normal(KEY, (2, 10, D_MODEL))
  params = layer.init(KEY, x)
  apply = jax.jit(layer.apply, static_argnames=("mode",))
  full = apply(params, x)
  empty = init_hyena_cache(2, D_MODEL, D_CONV, 16, jnp.float32)
  y, cache = apply(params, x[:, :4], cache=empty, mode="prefill")
  outs = [y]
  for t in range(4, 10):
    pos = jnp.full((2, 1), t, jnp.int32)
    y, cache = apply(params, x[:, t:t + 1], positions=pos, cache=cache, mode="decode")
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
  _, whole = apply(params, x, cache=empty, mode="prefill")
  np.testing.assert_allclose(cache["history"], whole["history"], atol=1e-6, rtol=1e-6)
  assert np.all(np.asarray(whole["history"][:, 10:]) == 0)
  with pytest.raises(ValueError, match="does not fit"):
    layer.apply(params, x, cache=init_hyena_cache(2, D_MODEL, D_CONV, 6, jnp.float32),
                mode="prefill")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
  layer = small_layer(dtype=dtype)
  x = jnp.ones((2, 5, D_MODEL), dtype)
  params = layer.init(KEY, x)["params"]
  assert params["in_proj"]["kernel"].shape == (D_MODEL, 3 * D_MODEL)
  assert params["filter"]["out"]["kernel"].shape == (16, D_MODEL)
  y, cache = layer.apply({"params": params}, x, cache=init_hyena_cache(2, D_MODEL, D_CONV, 7, dtype),
                         mode="prefill")
  assert y.shape == x.shape and y.dtype == dtype
  assert cache["history"].shape == (2, 7, D_MODEL) and cache["history"].dtype == dtype
  assert cache["conv"].shape == (2, D_CONV - 1, 3 * D_MODEL)


def test_gradients_are_finite():
  layer = small_layer()
  x = jax.random.normal(KEY, (2, 7, D_MODEL))
  params = layer.init(KEY, x)
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1)))(params, x)
  for g in jax.tree_util.tree_leaves(grads):
    assert jnp.all(jnp.isfinite(g)) and jnp.any(g != 0)


@pytest.mark.parametrize("field,value", [("filter_width", 0), ("decay_min", 0.0)])
def test_config_errors_name_the_field(field, value):
  config = config_lib.base_config()
  config.task.name = "mqar"
  config.model.pattern = "HA"
  config.model.hyena[field] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.model.hyena.{field}"):
    config_lib.validate(config)
