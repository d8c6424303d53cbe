"""The S4D mixer (ssm_lab.layers.s4d): shapes and dtypes, the FFT convolution against a plain
per-step recurrence in NumPy, FFT against the selective_scan path, the prefill state in closed form,
finite gradients, and config errors that name the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab.layers.s4d import S4DMixer, causal_conv, causal_fft_conv, init_s4d_cache, s4d_kernel

KEY = jax.random.PRNGKey(0)


def recurrence(u, dt, A, B, C, D):
  """The LTI SSM stepped token by token in float64. u [b, L, c] -> (y [b, L, c], h_L [b, c, n])."""
  u, dt, A, B, C, D = (np.asarray(a, np.float64) for a in (u, dt, A, B, C, D))
  h = np.zeros((u.shape[0], u.shape[2], A.shape[1]))
  ys = []
  for t in range(u.shape[1]):
    h = np.exp(dt[:, None] * A) * h + (dt[:, None] * B) * u[:, t, :, None]
    ys.append(np.sum(C * h, axis=-1) + D * u[:, t])
  return np.stack(ys, axis=1), h


def random_ssm(c=6, n=4, seed=0):
  rng = np.random.default_rng(seed)
  dt = np.exp(rng.uniform(np.log(1e-2), np.log(0.5), c))
  A = -np.exp(rng.normal(0, 0.5, (c, n)))
  return (jnp.asarray(x, jnp.float32) for x in (dt, A, rng.normal(size=(c, n)),
                                                rng.normal(size=(c, n)), rng.normal(size=c)))


def test_causal_fft_conv_equals_direct_convolution():
  rng = np.random.default_rng(1)
  u, k = rng.normal(size=(2, 13, 5)), rng.normal(size=(13, 5))
  direct = np.zeros_like(u)
  for t in range(13):
    for s in range(t + 1):
      direct[:, t] += k[t - s] * u[:, s]
  for conv in (causal_fft_conv, causal_conv):   # causal_conv: the direct form on this CPU
    np.testing.assert_allclose(conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32)),
                               direct, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kernel must be"):
      conv(jnp.zeros((1, 4, 2)), jnp.zeros((3, 2)))
  # Gradients of the direct form against the FFT form, for the input and the kernel.
  w = jnp.asarray(rng.normal(size=u.shape), jnp.float32)
  grads = [jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) * w), argnums=(0, 1))(
      jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32)) for f in (causal_fft_conv, causal_conv)]
  for got, want in zip(grads[1], grads[0], strict=True):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_fft_kernel_convolution_equals_the_recurrence():
  dt, A, B, C, D = random_ssm()
  u = jax.random.normal(KEY, (2, 17, 6))
  y = causal_fft_conv(u, s4d_kernel(dt, A, B, C, 17)) + u * D
  ref, _ = recurrence(u, dt, A, B, C, D)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate,conv", [(True, True), (False, False)])
def test_mixer_fft_equals_scan_and_prefill_state_equals_recurrence(gate, conv):
  layer = S4DMixer(d_model=8, d_state=4, expand=2, gate=gate, conv=conv)
  x = jax.random.normal(KEY, (2, 10, 8))
  params = layer.init(KEY, x)
  y_fft = layer.apply(params, x)
  y_scan = layer.clone(impl="scan").apply(params, x)
  np.testing.assert_allclose(y_fft, y_scan, atol=1e-5, rtol=1e-5)
  empty = init_s4d_cache(2, 16, 4, 4, conv, jnp.float32)
  y_pre, cache = layer.apply(params, x, cache=empty, mode="prefill")
  np.testing.assert_array_equal(y_pre, y_fft)   # prefill is the full computation
  _, state_scan = layer.clone(impl="scan").apply(params, x, cache=empty, mode="prefill")
  np.testing.assert_allclose(cache["ssm"], state_scan["ssm"], atol=1e-5, rtol=1e-5)
  assert ("conv" in cache) == conv and cache["ssm"].dtype == jnp.float32
  # The state in closed form equals the recurrence over the SSM's input (in_proj [+ conv, silu]).
  p = params["params"]
  xs = (x @ p["in_proj"]["kernel"])[..., :16]
  if conv:
    k = p["conv1d"]["kernel"][:, 0]
    pad = jnp.pad(xs, ((0, 0), (3, 0), (0, 0)))
    xs = jax.nn.silu(sum(pad[:, i:i + 10] * k[i] for i in range(4)) + p["conv1d"]["bias"])
  _, h = recurrence(xs, jnp.exp(p["log_dt"]), -jnp.exp(p["A_log"]), p["B"], p["C"], p["D"])
  np.testing.assert_allclose(cache["ssm"], h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_and_s4d_init(dtype):
  layer = S4DMixer(d_model=8, d_state=4, expand=2, dtype=dtype)
  x = jax.random.normal(KEY, (2, 5, 8)).astype(dtype)
  params = layer.init(KEY, x)["params"]
  assert params["in_proj"]["kernel"].shape == (8, 32)
  assert params["B"].shape == params["C"].shape == params["A_log"].shape == (16, 4)
  np.testing.assert_allclose(-jnp.exp(params["A_log"][0]), [-1, -2, -3, -4], rtol=1e-6)
  dt = jnp.exp(params["log_dt"])
  assert jnp.all((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 0.1 * (1 + 1e-6)))
  y = layer.apply({"params": params}, x)
  assert y.shape == x.shape and y.dtype == dtype
  no_gate = S4DMixer(d_model=8, d_state=4, gate=False, conv=False).init(KEY, x)["params"]
  assert no_gate["in_proj"]["kernel"].shape == (8, 16) and "conv1d" not in no_gate


def test_gradients_are_finite():
  layer = S4DMixer(d_model=8, d_state=4)
  x = jax.random.normal(KEY, (2, 7, 8))
  params = layer.init(KEY, x)
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1)))(params, x)
  for g in jax.tree_util.tree_leaves(grads):
    assert jnp.all(jnp.isfinite(g)) and jnp.any(g != 0)


@pytest.mark.parametrize("field,value,match", [
    ("impl", "cuda", "config.model.s4d.impl"),
    ("d_state", 0, "config.model.s4d.d_state"),
    ("dt_min", 0.5, "config.model.s4d.dt_min"),
])
def test_config_errors_name_the_field(field, value, match):
  config = config_lib.base_config()
  config.task.name = "mqar"
  config.model.pattern = "DA"
  config.model.s4d[field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)
