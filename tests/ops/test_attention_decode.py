"""attention_decode: decoding through a KV cache (linear and sliding-window ring buffer) equals full
causal attention; xla against the reference; position masking; validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import ops
from ssm_lab.ops.attention import DECODE_REGISTRY

IMPLS = ["reference", "xla"]


def normal(rng, shape, dtype=jnp.float32):
  # NumPy draws: jax.random's first compile costs seconds on a CI CPU.
  return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)


def make_seq(seed, batch=2, length=13, heads=4, kv_heads=2, head_dim=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = normal(rng, (batch, length, heads, head_dim), dtype)
  k = normal(rng, (batch, length, kv_heads, head_dim), dtype)
  v = normal(rng, (batch, length, kv_heads, head_dim), dtype)
  return q, k, v


def decode_through_cache(q, k, v, cache_len, chunk, impl, window=None):
  """Feeds the sequence `chunk` tokens at a time: write their K/V at slot pos % cache_len (a linear
  cache when cache_len >= length, a ring buffer otherwise), then attend the chunk to the cache."""
  batch, length, _, _ = q.shape
  k_cache = jnp.zeros((batch, cache_len) + k.shape[2:], k.dtype)
  v_cache = jnp.zeros_like(k_cache)
  kv_pos = jnp.full((batch, cache_len), -1, jnp.int32)

  @jax.jit
  def step(k_cache, v_cache, kv_pos, pos):
    slots = pos % cache_len
    k_cache = k_cache.at[:, slots].set(k[:, pos])
    v_cache = v_cache.at[:, slots].set(v[:, pos])
    kv_pos = kv_pos.at[:, slots].set(pos)
    q_pos = jnp.broadcast_to(pos, (batch, pos.shape[0]))
    out = ops.attention_decode(q[:, pos], k_cache, v_cache, q_positions=q_pos,
                               kv_positions=kv_pos, sliding_window=window, impl=impl)
    return k_cache, v_cache, kv_pos, out

  outs = []
  for start in range(0, length, chunk):
    pos = np.arange(start, min(start + chunk, length), dtype=np.int32)
    k_cache, v_cache, kv_pos, out = step(k_cache, v_cache, kv_pos, pos)
    outs.append(out)
  return jnp.concatenate(outs, axis=1)


def full_attention(q, k, v, window=None):
  return jax.jit(lambda q, k, v: ops.attention(q, k, v, causal=True, sliding_window=window,
                                               impl="reference"))(q, k, v)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_linear_cache_equals_full_causal(impl, chunk):
  q, k, v = make_seq(0)
  full = full_attention(q, k, v)
  got = decode_through_cache(q, k, v, cache_len=16, chunk=chunk, impl=impl)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [1, 2])
def test_ring_buffer_equals_sliding_window(impl, chunk):
  # A ring of `window` slots holds exactly the keys a sliding window of `window` may see, provided
  # a chunk never overwrites a key an earlier query of the same chunk still needs: the ring gets
  # chunk - 1 spare slots.
  window = 5
  q, k, v = make_seq(1, length=17, heads=4, kv_heads=1)
  full = full_attention(q, k, v, window)
  got = decode_through_cache(q, k, v, cache_len=window + chunk - 1, chunk=chunk, impl=impl,
                             window=window)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=2e-5)


def test_bf16_decode_tracks_reference():
  q, k, v = make_seq(2, length=9, head_dim=16, dtype=jnp.bfloat16)
  full = full_attention(q, k, v)
  got = decode_through_cache(q, k, v, cache_len=12, chunk=1, impl="xla")
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(full, np.float32), atol=3e-2)


def test_xla_matches_reference_on_scattered_positions_and_empty_rows():
  batch, q_len, cache_len, heads, kv_heads, d = 3, 4, 10, 4, 2, 8
  rng = np.random.default_rng(3)
  q = normal(rng, (batch, q_len, heads, d))
  kc = normal(rng, (batch, cache_len, kv_heads, d))
  vc = normal(rng, (batch, cache_len, kv_heads, d))
  kv_pos = jnp.array([[7, 3, -1, 9, 0, 5, -1, 8, 1, 2],
                      [-1] * 10,
                      [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]], jnp.int32)
  q_pos = jnp.array([[2, 5, 8, 9], [0, 1, 2, 3], [19, 22, 25, 40]], jnp.int32)
  for window in (None, 3):
    ref, got = (jax.jit(lambda q, kc, vc, impl=impl, window=window: ops.attention_decode(
        q, kc, vc, q_positions=q_pos, kv_positions=kv_pos, sliding_window=window, impl=impl))(
            q, kc, vc) for impl in ("reference", "xla"))
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
    # Empty cache (batch 1), a query before every cached key (batch 2, position 19): zeros.
    assert not np.any(np.asarray(got[1]))
    assert not np.any(np.asarray(got[2, 0]))
    assert np.all(np.any(np.asarray(got[0]) != 0, axis=(-1, -2)))
  # Batch 0, query at position 2 sees slots holding 0, 1, 2 only: check one row by hand.
  vis = np.array([4, 8, 9])
  logits = np.einsum("d,kd->k", np.asarray(q[0, 0, 0]), np.asarray(kc[0, vis, 0])) / np.sqrt(d)
  p = np.exp(logits - logits.max())
  want = (p / p.sum()) @ np.asarray(vc[0, vis, 0])
  np.testing.assert_allclose(ref[0, 0, 0], want, atol=1e-5)


def test_auto_picks_xla_on_cpu():
  assert DECODE_REGISTRY.auto_order("cpu") == ["xla"]
  if jax.default_backend() == "cpu":
    q = jnp.zeros((1, 1, 2, 8))
    c = jnp.zeros((1, 4, 2, 8))
    call = dict(q=q, k_cache=c, v_cache=c, q_positions=jnp.zeros((1, 1), jnp.int32),
                kv_positions=jnp.zeros((1, 4), jnp.int32), sliding_window=None, scale=1.0)
    assert DECODE_REGISTRY.resolve("auto", **call).name == "xla"


@pytest.mark.parametrize("bad,match", [
    (dict(q_positions=jnp.zeros((1, 3), jnp.int32)), r"q_positions must have shape"),
    (dict(kv_positions=jnp.zeros((1, 5), jnp.int32)), r"kv_positions must have shape"),
    (dict(q_positions=jnp.zeros((1, 2))), "integers"),
    (dict(v_cache=jnp.zeros((1, 6, 2, 4))), "same shape"),
    (dict(k_cache=jnp.zeros((1, 6, 3, 8)), v_cache=jnp.zeros((1, 6, 3, 8))), "multiple of kv_heads"),
    (dict(k_cache=jnp.zeros((2, 6, 2, 8)), v_cache=jnp.zeros((2, 6, 2, 8))), "batch and head_dim"),
    (dict(q=jnp.zeros((1, 2, 4, 8), jnp.bfloat16)), "share a dtype"),
    (dict(q=jnp.zeros((2, 4, 8))), "rank 4"),
    (dict(sliding_window=0), ">= 1"),
    (dict(impl="pallas"), "not one of"),
])
def test_validation_errors(bad, match):
  args = dict(q=jnp.zeros((1, 2, 4, 8)), k_cache=jnp.zeros((1, 6, 2, 8)),
              v_cache=jnp.zeros((1, 6, 2, 8)), q_positions=jnp.zeros((1, 2), jnp.int32),
              kv_positions=jnp.zeros((1, 6), jnp.int32))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    ops.attention_decode(**args)
