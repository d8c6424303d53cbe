"""Tests for ssm_lab.ops.ssd: every impl against the reference (values, final state, gradients),
chunk sizes that do not divide the length, initial/final state, validation and impl selection.

The Pallas kernels run in interpret mode on CPU; `-m gpu` runs them compiled (device tool)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab.ops import ssd
from ssm_lab.ops.pallas import ssd as pallas_ssd
from ssm_lab.ops.pallas.ssd import choose_layout, choose_segments, ssd_pallas
from ssm_lab.ops.ssd import REGISTRY
from ssm_lab.ops.pallas.lowering import lower_for_gpu

ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


@functools.partial(jax.jit, static_argnums=tuple(range(1, 8)))
def _make(key, b, l, h, p, g, n, dtype):
  ks = jax.random.split(key, 8)
  return dict(
      x=jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
      dt=jax.random.normal(ks[1], (b, l, h)).astype(dtype),
      A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.5)).astype(dtype),
      B=jax.random.normal(ks[3], (b, l, g, n)).astype(dtype),
      C=jax.random.normal(ks[4], (b, l, g, n)).astype(dtype),
      D=jax.random.normal(ks[5], (h,)),
      dt_bias=jax.random.normal(ks[6], (h,)) - 1.0,
      initial_state=jax.random.normal(ks[7], (b, h, p, n)),
  )


def make(key, b=2, l=37, h=4, p=8, g=2, n=6, dtype=jnp.float32):
  return _make(key, b, l, h, p, g, n, dtype)


def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _call(impl, a, **kw):
  fn = ssd_pallas if impl == "pallas-direct" else ssd
  extra = {} if impl == "pallas-direct" else {"impl": impl}
  return fn(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], dt_bias=a["dt_bias"],
            dt_softplus=True, initial_state=a["initial_state"], return_final_state=True,
            **extra, **kw)


# Jitted once per (impl, options, shapes): one compile instead of hundreds of eager dispatches, and
# repeated reference calls hit the cache; keeps the file fast on CI's 2 cores.
KNOBS = ("chunk_size", "segments", "ds_block", "num_warps_chunk", "fwd_block")
_call_jit = jax.jit(_call, static_argnums=(0,), static_argnames=KNOBS)


def call(impl, a, **kw):
  return _call_jit(impl, a, **kw)


def _loss(impl, a, **kw):
  """A fixed, non-trivial linear functional of (y, final_state)."""
  y, s = _call(impl, a, **kw)
  wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
  ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32).reshape(s.shape))
  return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(s * ws)


_grads_jit = jax.jit(jax.grad(_loss, argnums=1), static_argnums=(0,), static_argnames=KNOBS)


def grads(impl, a, **kw):
  """Gradients of `_loss` w.r.t. every input."""
  return _grads_jit(impl, a, **kw)


def numpy_ssd(a):
  """Float64 loop over tokens, written straight from the docstring's recurrence."""
  f = lambda k: np.asarray(a[k], np.float64)
  x, dt, A, B, C, D, bias, s = (f(k) for k in ARGS)
  dt = np.log1p(np.exp(dt + bias))
  b, l, h, p = x.shape
  rep = h // B.shape[2]
  y = np.zeros_like(x)
  for t in range(l):
    for hh in range(h):
      bt, ct = B[:, t, hh // rep], C[:, t, hh // rep]                   # [b, n]
      s[:, hh] = (np.exp(dt[:, t, hh] * A[hh])[:, None, None] * s[:, hh]
                  + dt[:, t, hh, None, None] * x[:, t, hh, :, None] * bt[:, None, :])
      y[:, t, hh] = np.einsum("bpn,bn->bp", s[:, hh], ct) + D[hh] * x[:, t, hh]
  return y, s


def test_reference_matches_float64_loop():
  a = make(jax.random.PRNGKey(0))
  y, s = call("reference", a)
  y_np, s_np = numpy_ssd(a)
  np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(s), s_np, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunked_matches_reference(chunk):
  a = make(jax.random.PRNGKey(1))                                     # length 37: no chunk divides it
  y_ref, s_ref = call("reference", a)
  y, s = call("chunked", a, chunk_size=chunk)
  assert y.shape == y_ref.shape and y.dtype == jnp.float32
  assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("chunk", [8, 64])   # 64 > length 37: one unpadded chunk
def test_chunked_gradients_match_reference(chunk):
  a = make(jax.random.PRNGKey(2))
  g_ref = grads("reference", a)
  g = grads("chunked", a, chunk_size=chunk)
  for k in ARGS:
    assert rel(g[k], g_ref[k]) < 1e-4, k


def _errors_vs_reference(a, **kw):
  """(relative errors of y and the final state, of every gradient) of the direct pallas call."""
  y_ref, s_ref = call("reference", a)
  y, s = call("pallas-direct", a, **kw)
  g_ref = grads("reference", a)
  g = grads("pallas-direct", a, **kw)
  return max(rel(y, y_ref), rel(s, s_ref)), {k: rel(g[k], g_ref[k]) for k in ARGS}


def test_pallas_matches_reference_values_and_gradients():
  # head_dim 8 and d_state 6 exercise the padding to 16; length 37 the padding to whole chunks and
  # segments; 2 segments the state hand-over between them (the one-segment path: tests below).
  out, grad = _errors_vs_reference(make(jax.random.PRNGKey(3)), chunk_size=16, segments=2)
  assert out < 1e-5 and max(grad.values()) < 1e-4, (out, grad)


def test_pallas_chunked_backward_head_dim_blocks_and_one_segment():
  # head_dim 20 (padded to 32) in two dS-pass blocks of 16 rows; one segment of 5 chunks (length 70,
  # chunk 16, so the last chunk is padded); 3 groups of 2 heads.
  a = make(jax.random.PRNGKey(10), b=1, l=70, h=6, p=20, g=3, n=8)
  g_ref = grads("reference", a)
  g = grads("pallas-direct", a, chunk_size=16, segments=1, ds_block=16)
  for k in ARGS:
    assert rel(g[k], g_ref[k]) < 1e-4, k


def test_pallas_segments_with_forward_head_dim_blocks():
  # Length 70 pads to a multiple of the cut (4 segments of 2 chunks of 16); fwd_block 16: the
  # forward's programs own 16 of the 32 head_dim rows each.
  out, grad = _errors_vs_reference(make(jax.random.PRNGKey(11), b=1, l=70, h=2, p=32, g=1, n=8),
                                   chunk_size=16, segments=4, fwd_block=16)
  assert out < 1e-5 and max(grad.values()) < 1e-4, (out, grad)


# dS_end is stored in bf16 here (bf16 x).
@pytest.mark.parametrize("kw", [{}, {"num_warps_chunk": 8}])
def test_pallas_bfloat16_close_to_float32_reference(kw):
  a = make(jax.random.PRNGKey(4), b=1, l=96, h=2, p=16, g=1, n=16, dtype=jnp.bfloat16)
  a32 = {k: v.astype(jnp.float32) for k, v in a.items()}
  y, s = call("pallas-direct", a, chunk_size=32, **kw)
  y_ref, s_ref = call("reference", a32)
  assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert rel(y, y_ref) < 2e-2 and rel(s, s_ref) < 2e-2
  g, g_ref = grads("pallas-direct", a, chunk_size=32, **kw), grads("reference", a32)
  for k in ARGS:
    assert g[k].dtype == a[k].dtype, k
    assert rel(g[k], g_ref[k]) < 3e-2, k


@pytest.mark.parametrize("impl", ["reference", "chunked", "pallas"])
def test_plain_call_without_state(impl):
  a = make(jax.random.PRNGKey(5))
  plain = lambda impl, chunk: jax.jit(
      lambda x, dt, A, B, C: ssd(x, dt, A, B, C, impl=impl, chunk_size=chunk))
  y = plain(impl, 16)(a["x"], a["dt"], a["A"], a["B"], a["C"])
  y_ref = plain("reference", None)(a["x"], a["dt"], a["A"], a["B"], a["C"])
  assert isinstance(y, jax.Array) and y.shape == a["x"].shape
  assert rel(y, y_ref) < 1e-5


def test_initial_state_continues_a_split_sequence():
  # Running two pieces with the state handed over equals running the whole sequence (pallas; the
  # value tests above pass an initial state to every impl).
  a = make(jax.random.PRNGKey(6))

  @functools.partial(jax.jit, static_argnums=(1,))
  def run(a, sl, s0):
    return ssd(a["x"][:, sl], a["dt"][:, sl], a["A"], a["B"][:, sl], a["C"][:, sl], D=a["D"],
               dt_bias=a["dt_bias"], dt_softplus=True, initial_state=s0, return_final_state=True,
               impl="pallas", chunk_size=16)

  y_all, s_all = run(a, slice(None), None)
  y1, s1 = run(a, slice(0, 23), None)
  y2, s2 = run(a, slice(23, None), s1)
  assert rel(jnp.concatenate([y1, y2], axis=1), y_all) < 1e-5
  assert rel(s2, s_all) < 1e-5


def test_validation_errors_name_the_argument():
  a = make(jax.random.PRNGKey(7))
  x, dt, A, B, C = (a[k] for k in ("x", "dt", "A", "B", "C"))
  with pytest.raises(ValueError, match=r"dt must have shape"):
    ssd(x, dt[:, :-1], A, B, C)
  with pytest.raises(ValueError, match=r"A must have shape"):
    ssd(x, dt, A[:-1], B, C)
  with pytest.raises(ValueError, match=r"C must have shape"):
    ssd(x, dt, A, B, C[..., :-1])
  with pytest.raises(ValueError, match=r"n_groups=3 .* must divide heads=4"):
    ssd(x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match=r"initial_state must have shape"):
    ssd(x, dt, A, B, C, initial_state=a["initial_state"][:, :2])
  with pytest.raises(ValueError, match=r"x must be float32 or bfloat16"):
    ssd(x.astype(jnp.int32), dt, A, B, C)
  with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
    ssd(x, dt, A, B, C, chunk_size=0)
  with pytest.raises(ValueError, match=r"impl='nope' is not one of"):
    ssd(x, dt, A, B, C, impl="nope")


def test_impl_selection():
  assert REGISTRY.auto_order("cpu") == ["chunked"]
  assert REGISTRY.auto_order("gpu")[0] == "pallas"
  a = make(jax.random.PRNGKey(8))
  with pytest.raises(ValueError, match=r"ssd\(impl='pallas'\) does not support .*chunk_size"):
    ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], impl="pallas", chunk_size=24)
  # auto on a GPU falls back to chunked for a chunk size the kernels cannot tile.
  chosen = REGISTRY.resolve("auto", backend="gpu", x=a["x"], B=a["B"], chunk_size=24)
  assert chosen.name == "chunked"


@pytest.mark.parametrize("dtype,want", [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32)])
def test_pallas_ds_dtype_follows_x(dtype, want):
  # The dS pass's per-chunk output (dS_end of every chunk, between the backward's two kernels) is
  # bf16 for bf16 inputs and float32 for float32 ones.
  a = make(jax.random.PRNGKey(12), b=1, l=64, h=2, p=16, g=1, n=16, dtype=dtype)

  def ds_dtypes(**kw):
    jaxpr = jax.make_jaxpr(lambda a: grads("pallas-direct", a, chunk_size=16, **kw))(a)
    found = set()

    def walk(jp):
      for eqn in jp.eqns:
        if eqn.primitive.name == "pallas_call" and "ssd_ds_kernel" in str(eqn.params["name"]):
          found.add(eqn.outvars[0].aval.dtype)
        for p in eqn.params.values():             # nested programs (jit, custom_vjp): duck-typed
          if hasattr(p, "eqns"):
            walk(p)
          elif hasattr(getattr(p, "jaxpr", None), "eqns"):
            walk(p.jaxpr)
    walk(jaxpr.jaxpr)
    return found

  assert ds_dtypes() == {jnp.dtype(want)}


def test_pallas_knob_errors_name_the_knob():
  a = make(jax.random.PRNGKey(11))
  x, dt, A, B, C = (a[k] for k in ("x", "dt", "A", "B", "C"))
  with pytest.raises(ValueError, match=r"ds_block must be a power of two >= 16, got 24"):
    ssd_pallas(x, dt, A, B, C, ds_block=24)
  with pytest.raises(ValueError, match=r"fwd_block must be a power of two >= 16, got 8"):
    ssd_pallas(x, dt, A, B, C, fwd_block=8)
  for gone in ("bwd", "fwd", "bwd_split", "group_sum", "ds_dtype", "segments_bwd"):  # deleted options
    with pytest.raises(TypeError, match=gone):
      ssd_pallas(x, dt, A, B, C, **{gone: None})


def test_choose_segments():
  assert choose_segments(8, 24, 32) == 2          # 192 programs -> 384
  assert choose_segments(1, 24, 1024) == 16       # long sequence, one sequence
  assert choose_segments(1, 24, 8) == 1           # too few chunks to split
  assert choose_segments(64, 24, 1024) == 1


def test_choose_layout():
  # (segments, fwd_block)
  assert choose_layout(8, 24, 32, 64) == (1, 32)     # 192 programs; split over head_dim: 384
  assert choose_layout(2, 24, 128, 64) == (8, 0)     # split gives 96: not enough, cut in 8
  assert choose_layout(1, 24, 1024, 64) == (16, 0)
  assert choose_layout(8, 24, 32, 32) == (2, 0)      # head_dim 32: nothing to split
  assert choose_layout(64, 24, 32, 64) == (1, 0)     # already full
  assert choose_layout(1, 2, 8, 64, min_programs=4) == (1, 32)


def test_pallas_default_layout_split_forward_matches_reference(monkeypatch):
  # A small MIN_PROGRAMS makes the default call take choose_layout's head_dim split (1 x 2 heads x
  # 2 blocks of 32 rows), with no segment cut; values and every gradient against the reference.
  monkeypatch.setattr(pallas_ssd, "MIN_PROGRAMS", 4)
  assert choose_layout(1, 2, 3, 64) == (1, 32)
  out, grad = _errors_vs_reference(make(jax.random.PRNGKey(12), b=1, l=41, h=2, p=64, g=1, n=8),
                                   chunk_size=16)
  assert out < 1e-5 and max(grad.values()) < 1e-4, (out, grad)


def _lower_for_h100(fn, *args) -> str:
  return lower_for_gpu(fn, *args, gpu="H100")


@pytest.mark.parametrize("kw", [{"segments": 2}, {"fwd_block": 32}])
def test_kernels_lower_for_the_gpu(kw, monkeypatch):
  """Forward and backward lower to Triton for an H100 (bf16, 2 groups of 2 heads, benchmark
  head_dim/d_state), both layouts: forward, dS pass and chunk kernel."""
  monkeypatch.setattr(pallas_ssd, "interpret_mode", lambda: False)
  b, l, h, p, g, n = 2, 1024, 4, 64, 2, 128
  sds = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)   # noqa: E731
  args = (sds(b, l, h, p), sds(b, l, h, dt=jnp.float32), sds(h, dt=jnp.float32), sds(b, l, g, n),
          sds(b, l, g, n))

  def loss(x, dt, A, B, C):
    y, s = ssd_pallas(x, dt, A, B, C, return_final_state=True, **kw)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

  txt = _lower_for_h100(jax.grad(loss, argnums=tuple(range(5))), *args)
  assert txt.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"segments": 2}])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_pallas_on_gpu_matches_reference(dtype, tol, kw):
  a = make(jax.random.PRNGKey(9), b=2, l=500, h=4, p=64, g=2, n=128, dtype=dtype)
  a["dt"] = (a["dt"] - 2.0).astype(dtype)
  a32 = {k: v.astype(jnp.float32) for k, v in a.items()}
  y, s = call("pallas-direct", a, **kw)
  y_ref, s_ref = call("reference", a32)
  assert rel(y, y_ref) < tol and rel(s, s_ref) < tol
  g = grads("pallas-direct", a, **kw)
  g_ref = grads("reference", a32)
  for k in ARGS:
    assert rel(g[k], g_ref[k]) < tol, k
