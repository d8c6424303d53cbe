"""The Mamba mixers' causal depthwise conv1d (ssm_lab.layers.mamba): the shifted-sum formulation
against XLA's grouped convolution (the formulation it replaced), its parameters against flax's
nn.Conv, the decode cache path, and that no convolution op is left in the gradient."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab.layers.mamba import (CausalDepthwiseConv1d, causal_depthwise_conv,
                                  shifted_depthwise_conv, torch_conv_init)


def grouped_conv(xs, kernel, bias):
  """The old formulation: a "valid" lax conv with one group per channel. xs [b, L + K - 1, ch]."""
  y = jax.lax.conv_general_dilated(xs, kernel, window_strides=(1,), padding="VALID",
                                   dimension_numbers=("NWC", "WIO", "NWC"),
                                   feature_group_count=xs.shape[-1],
                                   precision=jax.lax.Precision.HIGHEST)
  return y + bias


@pytest.mark.parametrize("d_conv", [4, 2])
def test_shifted_sum_matches_grouped_conv_values_and_gradients(d_conv):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  b, length, ch = 2, 9, 24
  xs = jax.random.normal(k1, (b, length + d_conv - 1, ch))
  kernel = jax.random.normal(k2, (d_conv, 1, ch))
  bias = jax.random.normal(k3, (ch,))
  w = jax.random.normal(k4, (b, length, ch))   # a random cotangent
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
  new = lambda x, k, c: shifted_depthwise_conv(x, k, c, jnp.float32)
  np.testing.assert_allclose(new(xs, kernel, bias), grouped_conv(xs, kernel, bias),
                             rtol=1e-5, atol=1e-5)
  g_new = jax.grad(loss(new), argnums=(0, 1, 2))(xs, kernel, bias)
  g_old = jax.grad(loss(grouped_conv), argnums=(0, 1, 2))(xs, kernel, bias)
  for gn, go in zip(g_new, g_old, strict=True):
    np.testing.assert_allclose(gn, go, rtol=1e-5, atol=1e-5)


def test_bfloat16_output_dtype_and_float32_accumulation():
  xs = jax.random.normal(jax.random.PRNGKey(1), (1, 7, 8)).astype(jnp.bfloat16)
  kernel = jax.random.normal(jax.random.PRNGKey(2), (4, 1, 8)).astype(jnp.bfloat16)
  bias = jnp.zeros((8,), jnp.bfloat16)
  y = shifted_depthwise_conv(xs, kernel, bias, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and y.shape == (1, 4, 8)
  ref = grouped_conv(xs.astype(jnp.float32), kernel.astype(jnp.float32), 0.0)
  # One rounding of the float32 sum: within a bf16 ulp of the exact result.
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)


def test_parameters_are_those_of_flax_depthwise_conv():
  """Same names, shapes and initial values as nn.Conv(feature_group_count=ch) under the same key,
  so checkpoints (and the HF import) map unchanged."""
  ch, d_conv = 12, 4
  x = jnp.ones((1, 5 + d_conv - 1, ch))
  init = torch_conv_init(d_conv)
  old = nn.Conv(ch, kernel_size=(d_conv,), feature_group_count=ch, padding="VALID", use_bias=True,
                kernel_init=init, bias_init=init)
  p_old = old.init(jax.random.PRNGKey(3), x)["params"]
  p_new = CausalDepthwiseConv1d(d_conv).init(jax.random.PRNGKey(3), x)["params"]
  assert set(p_new) == set(p_old) == {"kernel", "bias"}
  for name in p_old:
    assert p_new[name].shape == p_old[name].shape
    np.testing.assert_array_equal(p_new[name], p_old[name])
  np.testing.assert_allclose(CausalDepthwiseConv1d(d_conv).apply({"params": p_old}, x),
                             old.apply({"params": p_old}, x), rtol=1e-5, atol=1e-5)


class _Conv(nn.Module):
  mode: str = "full"

  @nn.compact
  def __call__(self, xs, cache=None):
    return causal_depthwise_conv(xs, d_conv=4, mode=self.mode, cache_conv=cache,
                                 dtype=jnp.float32, param_dtype=jnp.float32)


def test_decode_token_by_token_matches_full():
  xs = jax.random.normal(jax.random.PRNGKey(4), (2, 6, 8))
  params = _Conv().init(jax.random.PRNGKey(5), xs)
  y_full, none = _Conv().apply(params, xs)
  assert none is None
  y_pre, cache = _Conv("prefill").apply(params, xs[:, :3], jnp.zeros((2, 3, 8)))
  ys = [y_pre]
  for t in range(3, 6):
    y_t, cache = _Conv("decode").apply(params, xs[:, t:t + 1], cache)
    ys.append(y_t)
  np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cache, xs[:, 3:], rtol=0, atol=0)


def test_gradient_has_no_convolution_op():
  """The regression this formulation fixes: a grouped conv's kernel gradient is a batch-grouped
  convolution (a dense ch x ch conv once XLA expands it)."""
  xs = jnp.ones((2, 16, 32), jnp.bfloat16)
  params = _Conv().init(jax.random.PRNGKey(6), xs)
  loss = lambda p, x: jnp.sum(_Conv().apply(p, x)[0].astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).as_text()
  assert "convolution" not in text


def test_bad_kernel_shape_raises():
  with pytest.raises(ValueError, match="kernel must be"):
    shifted_depthwise_conv(jnp.ones((1, 8, 4)), jnp.ones((4, 1, 5)), jnp.ones((4,)), jnp.float32)
