"""Linen layers: output shapes and dtypes, official initialisations, RoPE and GQA behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import ops
from ssm_lab.layers import CausalSelfAttention, MambaMixer, RMSNorm, SwiGLU
from ssm_lab.layers.attention import apply_rope
from ssm_lab.layers.mlp import default_d_ff

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rmsnorm_normalises_and_keeps_dtype(dtype):
  x = jax.random.normal(KEY, (2, 5, 16)) * 7 + 3
  norm = RMSNorm(dtype=dtype)
  params = norm.init(KEY, x)
  y = norm.apply(params, x)
  assert y.dtype == dtype
  rms = jnp.sqrt(jnp.mean(y.astype(jnp.float32) ** 2, -1))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-2)


def test_swiglu_shape_and_default_width():
  assert default_d_ff(64) % 64 == 0 and default_d_ff(64) >= 64 * 8 // 3
  x = jnp.ones((2, 3, 32))
  mlp = SwiGLU(d_ff=96)
  params = mlp.init(KEY, x)["params"]
  assert params["gate"]["kernel"].shape == (32, 96)
  assert params["down"]["kernel"].shape == (96, 32)
  assert mlp.apply({"params": params}, x).shape == (2, 3, 32)


def test_rope_preserves_norm_and_relative_positions():
  q = jax.random.normal(KEY, (1, 6, 2, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 2, 8))
  pos = jnp.arange(6)[None]
  rq, rk = apply_rope(q, pos, 10000.0), apply_rope(k, pos, 10000.0)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  # Scores depend only on the offset: shifting both positions by 3 leaves q.k unchanged.
  rq3, rk3 = apply_rope(q, pos + 3, 10000.0), apply_rope(k, pos + 3, 10000.0)
  np.testing.assert_allclose(jnp.einsum("bqhd,bkhd->bhqk", rq, rk),
                             jnp.einsum("bqhd,bkhd->bhqk", rq3, rk3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_layer_shapes_and_causality(kv_heads):
  x = jax.random.normal(KEY, (2, 10, 32))
  layer = CausalSelfAttention(num_heads=4, num_kv_heads=kv_heads, head_dim=8)
  params = layer.init(KEY, x)["params"]
  assert params["k_proj"]["kernel"].shape == (32, kv_heads, 8)
  y = layer.apply({"params": params}, x)
  assert y.shape == x.shape
  # Changing a later token must not change earlier outputs.
  y2 = layer.apply({"params": params}, x.at[:, 7].set(5.0))
  np.testing.assert_allclose(y[:, :7], y2[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y[:, 7:], y2[:, 7:])


def test_attention_layer_respects_segments():
  x = jax.random.normal(KEY, (1, 8, 32))
  layer = CausalSelfAttention(num_heads=2, num_kv_heads=2, head_dim=16)
  params = layer.init(KEY, x)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]])
  y = layer.apply(params, x, segment_ids=seg, positions=pos)
  # The second document alone gives the same outputs as inside the packed row.
  y_alone = layer.apply(params, x[:, 3:])
  np.testing.assert_allclose(y[:, 3:], y_alone, rtol=1e-5, atol=1e-5)


def test_mamba_mixer_parameters_follow_the_official_initialisation():
  d_model, d_state, expand = 32, 16, 2
  mixer = MambaMixer(d_model=d_model, d_state=d_state, expand=expand)
  x = jax.random.normal(KEY, (2, 12, d_model))
  params = mixer.init(KEY, x)["params"]
  d_inner, rank = expand * d_model, math.ceil(d_model / 16)
  assert params["in_proj"]["kernel"].shape == (d_model, 2 * d_inner)
  assert params["conv1d"]["kernel"].shape == (4, 1, d_inner)
  # PyTorch's default Conv1d init, which the official Mamba keeps: U(+-1/sqrt(d_conv)), bias too.
  assert float(np.abs(params["conv1d"]["kernel"]).max()) <= 0.5
  assert float(np.abs(params["conv1d"]["bias"]).max()) <= 0.5
  assert float(np.abs(params["conv1d"]["bias"]).max()) > 0.0
  assert params["x_proj"]["kernel"].shape == (d_inner, rank + 2 * d_state)
  assert params["dt_proj_kernel"].shape == (rank, d_inner)
  assert np.abs(params["dt_proj_kernel"]).max() <= rank ** -0.5
  np.testing.assert_allclose(-jnp.exp(params["A_log"][0]), -jnp.arange(1, d_state + 1), rtol=1e-6)
  np.testing.assert_allclose(params["D"], 1.0)
  dt = jax.nn.softplus(params["dt_bias"])
  assert float(dt.min()) >= 1e-4 - 1e-7 and float(dt.max()) <= 0.1 + 1e-6
  y = mixer.apply({"params": params}, x)
  assert y.shape == x.shape and y.dtype == jnp.float32


def test_mamba_mixer_is_causal_and_impls_agree():
  x = jax.random.normal(KEY, (2, 12, 16))
  ref = MambaMixer(d_model=16, impl="reference")
  params = ref.init(KEY, x)
  y_ref = ref.apply(params, x)
  y_assoc = MambaMixer(d_model=16, impl="associative").apply(params, x)
  np.testing.assert_allclose(y_assoc, y_ref, rtol=1e-5, atol=1e-5)
  y2 = ref.apply(params, x.at[:, 9].set(3.0))
  np.testing.assert_allclose(y_ref[:, :9], y2[:, :9], rtol=1e-5, atol=1e-5)


def test_mamba_mixer_bfloat16_compute():
  x = jax.random.normal(KEY, (2, 8, 16)).astype(jnp.bfloat16)
  mixer = MambaMixer(d_model=16, dtype=jnp.bfloat16)
  params = mixer.init(KEY, x)["params"]
  assert params["in_proj"]["kernel"].dtype == jnp.float32
  assert mixer.apply({"params": params}, x).dtype == jnp.bfloat16


def test_ops_attention_is_what_the_layer_calls():
  assert callable(ops.attention) and callable(ops.selective_scan)
