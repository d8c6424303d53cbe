"""attention: xla and the Pallas kernel (interpret mode) against the reference, values and gradients;
block-skipping ranges of the kernel; impl selection and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import ops
from ssm_lab.ops.attention import REGISTRY
from ssm_lab.ops.pallas import attention as pa

# Small tiles so that short test sequences still span several blocks (diagonal, full and skipped).
TILES = pa.FlashConfig(fwd=pa.KernelConfig(16, 16, 4, 2), dkdv=pa.KernelConfig(16, 16, 4, 2),
                       dq=pa.KernelConfig(16, 32, 4, 2))


def make_inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32):
  # NumPy draws: jax.random's first compile costs seconds on a CI CPU.
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)

  return (normal(batch, q_len, heads, head_dim), normal(batch, kv_len, kv_heads, head_dim),
          normal(batch, kv_len, kv_heads, head_dim), normal(batch, q_len, heads, head_dim))


def segments(seed, batch, length, n=3):
  return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, n, (batch, length)), axis=1),
                     jnp.int32)


def naive(q, k, v, causal, window, seg):
  """Float64 NumPy loop over (batch, head, query) straight from the contract."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      kvh = hi // (h // kh)
      for i in range(lq):
        pos = i + lk - lq
        keep = np.ones(lk, bool)
        j = np.arange(lk)
        if causal:
          keep &= j <= pos
          if window is not None:
            keep &= j > pos - window
        if seg is not None:
          keep &= np.asarray(seg)[bi] == np.asarray(seg)[bi, i]
        if not keep.any():
          continue
        logits = k[bi, :, kvh] @ q[bi, i, hi] / np.sqrt(d)
        logits = np.where(keep, logits, -np.inf)
        p = np.exp(logits - logits.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, :, kvh]
  return out


def vjp_all(fn, q, k, v, ct):
  """(out, dq, dk, dv) for cotangent ct, as one jitted program (op-by-op dispatch is slower)."""
  def run(q, k, v, ct):
    out, pull = jax.vjp(fn, q, k, v)
    return (out,) + tuple(pull(ct))
  return jax.jit(run)(q, k, v, ct)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_reference_matches_naive_loop():
  q, k, v, _ = make_inputs(0, 2, 7, 11, 4, 2, 8)
  seg = None
  for causal, window in ((True, None), (True, 3), (False, None)):
    got = ops.attention(q, k, v, causal=causal, sliding_window=window, impl="reference")
    np.testing.assert_allclose(got, naive(q, k, v, causal, window, seg), atol=1e-5)
  q, k, v, _ = make_inputs(1, 2, 9, 9, 2, 1, 8)
  seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
  got = ops.attention(q, k, v, causal=True, segment_ids=seg, impl="reference")
  np.testing.assert_allclose(got, naive(q, k, v, True, None, seg), atol=1e-5)


# (batch, q_len, kv_len, heads, kv_heads, causal, window, segments, dtype); lengths are not tile
# multiples on purpose (padding), q_len != kv_len covers both alignments of the causal mask.
PALLAS_CASES = {
    "causal_gqa_qshort": (2, 24, 56, 4, 2, True, None, False, jnp.float32),
    "causal_mqa_qlong": (1, 56, 24, 4, 1, True, None, False, jnp.float32),
    "window_gqa": (1, 72, 72, 4, 2, True, 9, False, jnp.float32),
    "segments_noncausal": (2, 48, 48, 2, 2, False, None, True, jnp.float32),
    "segments_causal_window_bf16": (1, 64, 64, 2, 1, True, 20, True, jnp.bfloat16),
    "noncausal_cross_bf16": (1, 33, 50, 2, 2, False, None, False, jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(PALLAS_CASES))
def test_pallas_interpret_matches_reference(name):
  batch, lq, lk, heads, kv_heads, causal, window, use_seg, dtype = PALLAS_CASES[name]
  seed = sorted(PALLAS_CASES).index(name)
  q, k, v, ct = make_inputs(seed, batch, lq, lk, heads, kv_heads, 64, dtype)
  seg = segments(seed, batch, lq) if use_seg else None

  def run(impl):
    if impl == "pallas":
      fn = lambda q, k, v: pa.flash_attention(q, k, v, causal=causal, sliding_window=window,
                                              segment_ids=seg, config=TILES, interpret=True)
    else:
      fn = lambda q, k, v: ops.attention(q, k, v, causal=causal, sliding_window=window,
                                         segment_ids=seg, impl=impl)
    return vjp_all(fn, q, k, v, ct)

  ref = run("reference")
  got = run("pallas")
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
    assert g.dtype == r.dtype and g.shape == r.shape, what
    assert np.all(np.isfinite(np.asarray(g, np.float32))), what
    assert rel_err(g, r) < tol, (what, rel_err(g, r))
  if causal and lq > lk:  # queries before the first key see nothing: zeros, zero gradient
    assert not np.any(np.asarray(got[0][:, :lq - lk]))
    assert not np.any(np.asarray(got[1][:, :lq - lk]))


def test_pallas_through_public_function_default_tiles():
  # impl="pallas" by name, default (large) tiles shrunk to the short sequence.
  q, k, v, ct = make_inputs(3, 1, 40, 40, 2, 1, 64)
  ref = vjp_all(lambda q, k, v: ops.attention(q, k, v, impl="reference"), q, k, v, ct)
  got = vjp_all(lambda q, k, v: ops.attention(q, k, v, impl="pallas"), q, k, v, ct)
  for g, r in zip(got, ref, strict=True):
    assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("causal,window,q_len,kv_len", [(True, None, 21, 21), (True, 5, 30, 30),
                                                        (False, None, 13, 29), (True, None, 8, 19),
                                                        (True, None, 19, 8)])
def test_xla_matches_reference(causal, window, q_len, kv_len):
  q, k, v, ct = make_inputs(4, 2, q_len, kv_len, 4, 2, 16)
  seg = None
  if q_len == kv_len and not window:
    seg = segments(5, 2, q_len)
  ref = vjp_all(lambda q, k, v: ops.attention(q, k, v, causal=causal, sliding_window=window,
                                              segment_ids=seg, impl="reference"), q, k, v, ct)
  got = vjp_all(lambda q, k, v: ops.attention(q, k, v, causal=causal, sliding_window=window,
                                              segment_ids=seg, impl="xla"), q, k, v, ct)
  for g, r in zip(got, ref, strict=True):
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)


def _ranges(fn, start, major, minor, static):
  return tuple(int(x) for x in fn(jnp.int32(start), major, minor, static))


@pytest.mark.parametrize("causal,window,q_len,kv_len,seg", [
    (True, None, 200, 200, False), (True, 40, 200, 200, False), (True, 100, 70, 230, False),
    (True, None, 230, 70, False), (False, None, 90, 150, False), (True, 33, 128, 128, True)])
@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 16), (16, 64)])
def test_block_ranges_cover_visible_pairs_and_skip_the_rest(causal, window, q_len, kv_len, seg,
                                                            bq, bk):
  """Every visible (query, key) pair lies in a visited block; all-visible blocks hold no masked
  pair; blocks with no visible pair are skipped (that is what makes sliding windows cheap)."""
  q_pad, kv_pad = -(-q_len // 64) * 64, -(-kv_len // 64) * 64
  s = pa._Static(batch=1, heads=1, kv_heads=1, head_dim=64, q_len=q_len, kv_len=kv_len,
                 q_pad=q_pad, kv_pad=kv_pad, causal=causal, window=window, has_seg=seg,
                 scale=1.0, cfg=TILES, interpret=True)
  qpos = np.arange(q_pad)[:, None] + kv_len - q_len
  kpos = np.arange(kv_pad)[None, :]
  vis_all = np.array(np.broadcast_to(pa._visible(jnp.asarray(qpos), jnp.asarray(kpos), s),
                                     (q_pad, kv_pad)))
  vis = vis_all.copy()
  vis[q_len:] = False  # padded query rows are sliced off (they may still be computed)
  # Forward / dQ: per query block, kv blocks.
  for qb in range(q_pad // bq):
    lo, flo, fhi, hi = _ranges(pa._kv_range, qb * bq, bq, bk, s)
    assert lo <= flo <= fhi <= hi <= kv_pad // bk
    tile = vis[qb * bq:(qb + 1) * bq]
    for kb in range(kv_pad // bk):
      blk = tile[:, kb * bk:(kb + 1) * bk]
      if blk.any():
        assert lo <= kb < hi, (qb, kb)
      full_rows = vis_all[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
      if flo <= kb < fhi:
        assert full_rows.all(), (qb, kb)
      if not full_rows.any() and not seg:
        assert not lo <= kb < hi, ("visited an empty block", qb, kb)
  # dK/dV: per kv block, q blocks.
  for kb in range(kv_pad // bk):
    lo, flo, fhi, hi = _ranges(pa._q_range, kb * bk, bk, bq, s)
    assert lo <= flo <= fhi <= hi
    for qb in range(q_pad // bq):
      blk = vis[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
      if blk.any():
        assert lo <= qb < hi, (kb, qb)
      if flo <= qb < fhi:
        assert vis_all[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk].all(), (kb, qb)


def test_sliding_window_visits_few_blocks():
  s = pa._Static(batch=1, heads=1, kv_heads=1, head_dim=64, q_len=65536, kv_len=65536,
                 q_pad=65536, kv_pad=65536, causal=True, window=1024, has_seg=False, scale=1.0,
                 cfg=TILES, interpret=True)
  for qb in (0, 100, 511):
    lo, flo, fhi, hi = _ranges(pa._kv_range, qb * 128, 128, 64, s)
    assert hi - lo <= 1024 // 64 + 2
    assert hi - lo - (fhi - flo) <= 4  # only the two ends of the window are masked


def test_auto_order_and_supports():
  assert REGISTRY.auto_order("cpu") == ["xla"]
  assert REGISTRY.auto_order("gpu") == ["cudnn", "pallas", "xla"]
  q, k, v, _ = make_inputs(0, 1, 16, 16, 2, 2, 64, jnp.bfloat16)
  call = dict(q=q, k=k, v=v, causal=True, sliding_window=None, segment_ids=None, scale=0.125)
  assert REGISTRY.resolve("auto", **call).name == ("xla" if jax.default_backend() == "cpu"
                                                   else "cudnn")
  cudnn = REGISTRY.get("cudnn").supports
  if jax.default_backend() != "gpu":
    assert "GPU" in cudnn(**call)
  assert "bfloat16" in cudnn(**{**call, "q": q.astype(jnp.float32)})
  assert "segment_ids" in cudnn(**{**call, "segment_ids": jnp.zeros((1, 16), jnp.int32)})
  assert "q_len" in cudnn(**{**call, "q": q[:, :8]})
  assert "head_dim" in cudnn(**{**call, "q": jnp.zeros((1, 16, 2, 160), jnp.bfloat16)})
  pallas = REGISTRY.get("pallas").supports
  assert pallas(**call) is None
  assert "head_dim" in pallas(**{**call, "q": q[..., :32]})
  with pytest.raises(ValueError, match="head_dim 32"):
    ops.attention(q[..., :32], k[..., :32], v[..., :32], impl="pallas")
  with pytest.raises(ValueError, match="cudnn"):
    ops.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                  impl="cudnn")


@pytest.mark.parametrize("bad,match", [
    (dict(k=jnp.zeros((1, 8, 3, 16))), "multiple of kv_heads"),
    (dict(k=jnp.zeros((1, 8, 2, 8))), "must have the same shape"),
    (dict(q=jnp.zeros((1, 8, 4, 16), jnp.bfloat16)), "share a dtype"),
    (dict(q=jnp.zeros((8, 4, 16))), "rank 4"),
    (dict(q=jnp.zeros((1, 8, 4, 16), jnp.int32)), "float32 or bfloat16"),
    (dict(causal=False, sliding_window=4), "needs causal"),
    (dict(sliding_window=0), ">= 1"),
    (dict(q=jnp.zeros((1, 4, 4, 16)), segment_ids=jnp.zeros((1, 4), jnp.int32)), "q_len == kv_len"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), r"\[batch, length\]"),
    (dict(segment_ids=jnp.zeros((1, 8))), "integers"),
    (dict(impl="flash"), "not one of"),
])
def test_validation_errors(bad, match):
  args = dict(q=jnp.zeros((1, 8, 4, 16)), k=jnp.zeros((1, 8, 2, 16)), v=jnp.zeros((1, 8, 2, 16)))
  args.update(bad)
  if "k" in bad and "v" not in bad and bad["k"].shape[-1] == 16:
    args["v"] = jnp.zeros(bad["k"].shape)
  with pytest.raises(ValueError, match=match):
    ops.attention(**args)


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 17), (False, None)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_pallas_interpret_sweep(heads, kv_heads, causal, window, head_dim):
  q, k, v, ct = make_inputs(7, 1, 80, 80, heads, kv_heads, head_dim)
  ref = vjp_all(lambda q, k, v: ops.attention(q, k, v, causal=causal, sliding_window=window,
                                              impl="reference"), q, k, v, ct)
  got = vjp_all(lambda q, k, v: pa.flash_attention(q, k, v, causal=causal, sliding_window=window,
                                                   config=TILES, interpret=True), q, k, v, ct)
  for g, r in zip(got, ref, strict=True):
    assert rel_err(g, r) < 1e-5


@pytest.mark.gpu
def test_pallas_and_cudnn_on_gpu():
  """On a GPU: the compiled kernels against the float32 reference (benchmarks/attention.py runs the
  larger check)."""
  q, k, v, ct = make_inputs(8, 1, 1024, 1024, 8, 2, 128, jnp.bfloat16)
  with jax.default_matmul_precision("highest"):
    ref = vjp_all(lambda q, k, v: ops.attention(q, k, v, sliding_window=300, impl="reference"),
                  *(x.astype(jnp.float32) for x in (q, k, v, ct)))
  for impl in ("pallas", "cudnn"):
    got = vjp_all(lambda q, k, v, impl=impl: ops.attention(q, k, v, sliding_window=300, impl=impl),
                  q, k, v, ct)
    for g, r in zip(got, ref, strict=True):
      assert rel_err(g.astype(jnp.float32), r) < 2e-2, impl
