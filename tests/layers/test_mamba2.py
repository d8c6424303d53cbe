"""Tests for ssm_lab.layers.mamba2: shapes, dtypes, the official initialisation, impl agreement,
causality, prefill + decode against the full pass, the gated group norm and the FLOPs count."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab.layers.mamba2 import (GatedRMSNorm, Mamba2Mixer, init_mamba2_cache,
                                   mamba2_flops_per_token)

D_MODEL, D_STATE, HEAD_DIM, GROUPS, D_CONV = 32, 16, 16, 2, 4
D_INNER = 2 * D_MODEL
HEADS = D_INNER // HEAD_DIM
CONV_DIM = D_INNER + 2 * GROUPS * D_STATE


def mixer(**kw):
  base = dict(d_model=D_MODEL, d_state=D_STATE, head_dim=HEAD_DIM, n_groups=GROUPS, d_conv=D_CONV,
              chunk_size=16)
  return Mamba2Mixer(**(base | kw))


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 21, D_MODEL))
  params = jax.jit(mixer().init)(jax.random.PRNGKey(1), x)
  return x, params


def test_parameter_shapes(setup):
  _, params = setup
  shapes = jax.tree.map(lambda a: a.shape, params["params"])
  assert shapes == {
      "in_proj": {"kernel": (D_MODEL, 2 * D_INNER + 2 * GROUPS * D_STATE + HEADS)},
      "conv1d": {"kernel": (D_CONV, 1, CONV_DIM), "bias": (CONV_DIM,)},
      "dt_bias": (HEADS,), "A_log": (HEADS,), "D": (HEADS,),
      "norm": {"scale": (D_INNER,)},
      "out_proj": {"kernel": (D_INNER, D_MODEL)},
  }


def test_init_ranges():
  m = mixer(d_model=256, head_dim=8)                        # 64 heads: enough draws to see the range
  p = jax.jit(m.init)(jax.random.PRNGKey(2), jnp.zeros((1, 4, 256)))["params"]
  dt = jax.nn.softplus(p["dt_bias"])
  assert float(dt.min()) >= m.dt_init_floor * 0.999 and float(dt.max()) <= m.dt_max * 1.001
  assert float(dt.min()) < 0.01 < float(dt.max())           # log-uniform spread, not a constant
  a = jnp.exp(p["A_log"])
  assert float(a.min()) >= 1.0 and float(a.max()) <= 16.0 and float(a.std()) > 1.0
  np.testing.assert_array_equal(p["D"], 1.0)
  np.testing.assert_array_equal(p["norm"]["scale"], 1.0)
  bound = 1 / math.sqrt(D_CONV)
  assert float(jnp.abs(p["conv1d"]["kernel"]).max()) <= bound
  assert float(jnp.abs(p["conv1d"]["bias"]).max()) <= bound


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shape_and_dtype(setup, dtype):
  x, params = setup
  y = jax.jit(mixer(dtype=dtype).apply)(params, x.astype(dtype))
  assert y.shape == x.shape and y.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_impls_agree(setup):
  x, params = setup
  ys = {impl: jax.jit(mixer(impl=impl).apply)(params, x) for impl in
        ("reference", "chunked", "pallas")}
  for impl in ("chunked", "pallas"):
    np.testing.assert_allclose(ys[impl], ys["reference"], rtol=1e-4, atol=1e-5, err_msg=impl)


def test_causal(setup):
  x, params = setup
  apply = jax.jit(mixer().apply)
  y = apply(params, x)
  y2 = apply(params, x.at[:, 12:].set(7.0))
  np.testing.assert_allclose(y2[:, :12], y[:, :12], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y2[:, 12:] - y[:, 12:]).max()) > 1e-3


def test_prefill_then_decode_matches_full(setup):
  x, params = setup
  m = mixer()
  apply = jax.jit(m.apply, static_argnames=("mode",))
  full = apply(params, x)
  cache = init_mamba2_cache(2, d_inner=D_INNER, d_state=D_STATE, head_dim=HEAD_DIM,
                            n_groups=GROUPS, d_conv=D_CONV, dtype=jnp.float32)
  y, cache = apply(params, x[:, :13], cache=cache, mode="prefill")
  outs = [y]
  for t in range(13, 21):
    y, cache = apply(params, x[:, t:t + 1], cache=cache, mode="decode")
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)
  assert cache["ssm"].shape == (2, HEADS, HEAD_DIM, D_STATE) and cache["ssm"].dtype == jnp.float32


def test_gated_norm_is_per_group():
  y = jax.random.normal(jax.random.PRNGKey(3), (3, 8))
  z = jax.random.normal(jax.random.PRNGKey(4), (3, 8))
  norm = GatedRMSNorm(n_groups=2, eps=1e-6)
  out = norm.apply(norm.init(jax.random.PRNGKey(0), y, z), y, z)
  h = np.asarray(y * jax.nn.silu(z), np.float64).reshape(3, 2, 4)
  want = (h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-6)).reshape(3, 8)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_flops_per_token():
  d, n, p, e, g, k, q = 768, 128, 64, 2, 1, 4, 64
  di = e * d
  want = (2 * d * (2 * di + 2 * g * n + di // p) + 2 * k * (di + 2 * g * n)
          + 2 * q * g * n + 2 * q * di + 4 * di * n + 2 * di * d)
  assert mamba2_flops_per_token(d, n, p, e, g, k, q) == want


def test_bad_head_dim_raises():
  with pytest.raises(ValueError, match="multiple of head_dim=24"):
    mixer(head_dim=24).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, D_MODEL)))
