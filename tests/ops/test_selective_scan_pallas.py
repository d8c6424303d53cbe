"""The Pallas selective scan against the reference: values, final state and every gradient.

On CPU the kernels run in Pallas interpret mode (small shapes; each case compiles a few interpreted
kernels, so the cases are chosen to cover the kernel's branches once each: groups, channel and time
padding, d_state padding, time segments, no z / no initial state, softplus off, bf16), for both kernel
families: v6 (token by token, the default up to d_state 16) and v4 (time-parallel chunks). Also: the
scan primitive the v4 kernels use, against a sequential loop, and that the kernels lower to Triton
for an H100. The GPU
case is marked `gpu` and runs through the device tool (benchmarks/selective_scan.py checks realistic
shapes).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from ssm_lab.ops import selective_scan
from ssm_lab.ops.pallas import scan_primitive
from ssm_lab.ops.pallas import selective_scan as pss
from ssm_lab.ops.pallas.selective_scan import wrapper as pss_wrapper
from ssm_lab.ops.pallas.scan_primitive import linear_recurrence
from ssm_lab.ops.selective_scan import REGISTRY
from ssm_lab.ops.pallas.lowering import lower_for_gpu

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(seed, b, L, d, n, g, dtype, *, z=True, init=True, softplus=True, grouped_bc=True):
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  delta = 0.5 * jax.random.normal(ks[1], (b, L, d))
  bias = 0.3 * jax.random.normal(ks[7], (d,))
  if not softplus:                      # without softplus the step must already be positive
    delta, bias = jax.nn.softplus(delta), jnp.abs(bias)
  bc_shape = (b, L, g, n) if grouped_bc else (b, L, n)
  return dict(
      u=jax.random.normal(ks[0], (b, L, d)).astype(dtype),
      delta=delta.astype(dtype),
      A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d, n))),
      B=jax.random.normal(ks[3], bc_shape).astype(dtype),
      C=jax.random.normal(ks[4], bc_shape).astype(dtype),
      D=jax.random.normal(ks[5], (d,)),
      z=jax.random.normal(ks[6], (b, L, d)).astype(dtype) if z else None,
      delta_bias=bias,
      initial_state=jax.random.normal(ks[8], (b, d, n)) if init else None)


def _outputs_and_grads(inp, softplus, *, impl, config=None):
  """y, final state and the gradient of a random linear functional of both w.r.t. every input."""
  names = [k for k in ARGS if inp[k] is not None]
  b, L, d = inp["u"].shape
  n = inp["A"].shape[1]
  wy = jax.random.normal(jax.random.PRNGKey(11), (b, L, d))
  wh = jax.random.normal(jax.random.PRNGKey(12), (b, d, n))

  def run(*vals):
    kw = dict(zip(names, vals, strict=True))
    u, delta, A, B, C = (kw.pop(k) for k in ("u", "delta", "A", "B", "C"))
    kw.update(delta_softplus=softplus, return_final_state=True)
    if config is not None:
      B = B if B.ndim == 4 else B[:, :, None]
      C = C if C.ndim == 4 else C[:, :, None]
      return pss.selective_scan_pallas(u, delta, A, B, C, config=config, **kw)
    return selective_scan(u, delta, A, B, C, impl=impl, **kw)

  def loss(*vals):
    y, h = run(*vals)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h * wh)

  vals = [inp[k] for k in names]
  y, h = jax.jit(run)(*vals)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(vals)))))(*vals)
  return names, y, h, grads


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def check_matches_reference(inp, softplus, config, tol):
  names, y, h, grads = _outputs_and_grads(inp, softplus, impl="pallas", config=config)
  _, y_r, h_r, grads_r = _outputs_and_grads(inp, softplus, impl="reference")
  assert y.shape == y_r.shape and y.dtype == y_r.dtype
  assert h.shape == h_r.shape and h.dtype == jnp.float32
  errs = {"y": _rel(y, y_r), "final_state": _rel(h, h_r)}
  for k, g, g_r in zip(names, grads, grads_r, strict=True):
    assert g.shape == g_r.shape and g.dtype == g_r.dtype, k
    errs["d" + k] = _rel(g, g_r)
  bad = {k: v for k, v in errs.items() if not v <= tol}
  assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


# Each case: (b, L, d_inner, d_state, n_groups), dtype, options, Config, tolerance. Interpret mode
# is slow, so few cases cover the branches between them; wider ones run nightly.
V4 = dict(kernels="v4")      # the v4 kernels (the default is v6 up to d_state 16)
V6 = dict(kernels="v6")
CASES = {
    # v4 (time-parallel chunks). Two groups of 12 channels, each padded to 16: one forward block
    # of 16 per group, two backward blocks of 8 (bwd_block_d below block_d); d_state 5 padded to 8
    # (one state tile of 8); length 21 padded to 24 = 3 segments of 8 tokens = 2 chunks of 4, the
    # padded tail inside the last one (masked tokens); float32 B/C; no z, no initial state, no
    # softplus.
    "v4_f32_groups_segments": ((1, 21, 24, 5, 2), jnp.float32,
                               dict(z=False, init=False, softplus=False),
                               pss.Config(block_d=16, bwd_block_d=8, chunk=4, segments=3,
                                          state_block=8, bwd_state_block=8, **V4), 1e-5),
    # v4, bf16 activations with B/C given without the group axis, z gate, initial state, softplus;
    # one segment of two chunks; channels 12 padded to 16; length 7 padded to 8; the d_state of 4 in
    # two state tiles forward and one backward.
    "v4_bf16_z_init": ((2, 7, 12, 4, 1), jnp.bfloat16, dict(grouped_bc=False),
                       pss.Config(block_d=8, chunk=4, segments=1, state_block=2, bwd_state_block=4,
                                  **V4), 2e-2),
    # v4 at d_state 64 (Mamba's largest supported), two segments of one chunk each.
    "v4_f32_dstate64": ((1, 16, 8, 64, 1), jnp.float32, {},
                        pss.Config(block_d=8, chunk=8, segments=2, state_block=64,
                                   bwd_state_block=64, **V4), 1e-5),
    # v6 (forward, state pass, adjoint pass, backward): bf16, z, initial state, softplus, groups;
    # d_state 6 padded to 8 = 2 state tiles of 4; length 13 padded to 16 = 2 segments of 2 chunks of 4
    # (one sub-chunk pair each), masked tail.
    "v6_bf16_z_init_groups": ((1, 13, 16, 6, 2), jnp.bfloat16, {},
                              pss.Config(block_d=8, chunk=4, segments=2, **V6), 2e-2),
    # v6 in float32 (z, initial state, softplus), d_state 5 padded to 8; length 37 padded to 48 = 2
    # segments of 3 chunks of 8 (4 sub-chunks each), masked tail.
    "v6_f32_segments": ((1, 37, 16, 5, 2), jnp.float32, {},
                        pss.Config(block_d=8, chunk=8, segments=2, **V6), 1e-5),
    # v6 without z, initial state or softplus; backward blocks narrower than the forward's; d_state 4
    # (one state tile); 3 segments of 2 chunks of 4.
    "v6_f32_groups_segments": ((1, 21, 24, 4, 2), jnp.float32,
                               dict(z=False, init=False, softplus=False),
                               pss.Config(block_d=16, bwd_block_d=8, chunk=4, segments=3, **V6), 1e-5),
}
SLOW_CASES = {
    # v4 with the backward on narrower blocks, with z and initial state, two segments of 3 chunks.
    "v4_f32_bwd_narrower": ((1, 20, 24, 4, 1), jnp.float32, {},
                            pss.Config(block_d=16, bwd_block_d=8, chunk=4, segments=2,
                                       state_block=4, bwd_state_block=2, **V4), 1e-5),
    # v4 with one state per tile (2-D tiles), several chunks per segment and channel blocks.
    "v4_f32_wide": ((2, 37, 24, 16, 2), jnp.float32, {},
                    pss.Config(block_d=8, chunk=4, segments=2, state_block=1, bwd_state_block=2,
                               **V4), 1e-5),
    # v6 at d_state 16 (4 state tiles), several chunks per segment and channel blocks.
    "v6_f32_wide": ((2, 37, 24, 16, 2), jnp.float32, {}, pss.Config(block_d=8, chunk=4, segments=2, **V6),
                    1e-5),
}


def check_case(case):
  (b, L, d, n, g), dtype, opts, config, tol = case
  opts = dict(opts)
  softplus = opts.pop("softplus", True)
  inp = _inputs(0, b, L, d, n, g, dtype, softplus=softplus, **opts)
  check_matches_reference(inp, softplus, config, tol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
  check_case(CASES[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SLOW_CASES))
def test_matches_reference_wide(case):
  check_case(SLOW_CASES[case])


def test_public_op_by_name_with_default_tiling():
  """impl="pallas" through the public op, tiling from default_config (d_state 1, the smallest)."""
  inp = _inputs(3, 1, 9, 8, 1, 1, jnp.float32)
  kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True,
            initial_state=inp["initial_state"], return_final_state=True)
  args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
  y, h = selective_scan(*args, impl="pallas", **kw)
  y_r, h_r = selective_scan(*args, impl="reference", **kw)
  assert _rel(y, y_r) < 1e-5 and _rel(h, h_r) < 1e-5


def test_default_config_picks_v6_up_to_d_state_16():
  cfg = pss.default_config(8, 2048, 1536, 16)
  assert (cfg.kernels, cfg.chunk, cfg.block_d, cfg.num_warps, cfg.bwd_num_warps) == ("v6", 8, 32, 1, 1)
  # ~2048 one-warp programs: 8 x 48 channel blocks x 8 segments.
  assert cfg.segments == 8 and pss.default_config(1, 65536, 2048, 16).segments == 32
  # 1280 programs at (8, 2048, 5120): 2 segments leave the backward's last wave 40% full, 4 do not.
  assert pss.default_config(8, 2048, 5120, 16).segments == 4
  assert pss._v6_full_waves(3 * pss.V6_BWD_WAVE) and not pss._v6_full_waves(pss.V6_BWD_WAVE + 1)
  assert pss.default_config(1, 5, 8, 1).kernels == "v6"            # d_state 1 (padded to 2)
  for d_state in (17, 32, 64):
    assert pss.default_config(2, 1024, 256, d_state).kernels == "v4", d_state


def test_default_config_v4():
  v4 = pss.Config(kernels="v4")
  cfg = pss.default_config(8, 2048, 1536, 16, config=v4)
  assert cfg.kernels == "v4" and cfg.chunk == 16 and cfg.num_warps == 4
  assert cfg.state_block <= 16 and 16 % cfg.state_block == 0 and 16 % cfg.bwd_state_block == 0
  # Few (batch, channel block) programs: split time; many: do not; segments keep 8 chunks.
  long_narrow = pss.default_config(1, 65536, 2048, 16, config=v4).segments
  assert long_narrow > pss.default_config(8, 2048, 5120, 16, config=v4).segments == 1
  assert 65536 // long_narrow >= 8 * cfg.chunk
  assert pss.default_config(1, 5, 8, 1, config=v4).state_block == 2   # d_state 1 is padded to 2
  with pytest.raises(ValueError, match="state_block=3"):
    pss.default_config(1, 64, 32, 16, config=pss.Config(state_block=3))
  with pytest.raises(ValueError, match="chunk=6 must be a power of two"):
    pss.default_config(1, 64, 32, 16, config=pss.Config(chunk=6))
  with pytest.raises(ValueError, match="Config.kernels"):
    pss.default_config(1, 64, 32, 16, config=pss.Config(kernels="v5"))


def test_unsupported_calls_raise_by_name_and_fall_back_under_auto():
  inp = _inputs(0, 1, 8, 8, 65, 1, jnp.float32)
  args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
  with pytest.raises(ValueError, match=r"impl='pallas'.*d_state=65"):
    selective_scan(*args, impl="pallas")
  why = REGISTRY.get("pallas").supports(u=inp["u"], delta=inp["delta"], A=inp["A"], B=inp["B"],
                                        C=inp["C"])
  assert "d_state=65" in why
  # Under "auto" the call still runs (associative on CPU; on a GPU the fall-back from pallas).
  y = selective_scan(*args, impl="auto")
  assert y.shape == inp["u"].shape


def test_auto_picks_pallas_on_gpu_only():
  assert REGISTRY.auto_order("gpu")[0] == "pallas"
  assert "pallas" not in REGISTRY.auto_order("cpu")
  assert REGISTRY.get("pallas").auto_priority == {"gpu": 20}
  assert REGISTRY.get("associative").auto_priority["gpu"] < 20
  small = _inputs(0, 1, 4, 8, 4, 1, jnp.float32)
  call = dict(small, delta_softplus=True, return_final_state=False)
  assert REGISTRY.resolve("auto", backend="gpu", **call).name == "pallas"
  assert REGISTRY.resolve("auto", backend="cpu", **call).name == "associative"


@pytest.mark.gpu
def test_gpu_realistic_shape():
  """On the GPU: a Mamba-sized call (bf16, default tiling (v6), segments) against the reference, and
  the same with the v4 kernels."""
  inp = _inputs(5, 2, 4096, 768, 16, 1, jnp.bfloat16)
  check_matches_reference(inp, True, None, 1e-2)
  check_matches_reference(inp, True, pss.Config(**V4), 1e-2)


def test_log1p_formula_is_accurate_over_softplus_range():
  """The GPU kernels' log1p (the special-function unit's log2 corrected for the rounding of 1 + e),
  with exact log2 and 1/x in float32: within a few ulp of log1p over e = exp(-|x|) in [0, 1]."""
  e = np.concatenate([np.float32(2.0) ** -np.arange(0, 150, 0.37, dtype=np.float32),
                      np.linspace(0, 1, 4097, dtype=np.float32)]).astype(np.float32)
  # Op by op: under jit XLA on the CPU folds (1 + e) - 1 to e, which is the rounding being corrected.
  got = np.asarray(pss._log1p_from(jnp.asarray(e), jnp.log2, lambda w: 1.0 / w))
  want = np.log1p(e.astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=4e-7, atol=0)


# --------------------------------------------------------------------------------------------------
# The scan primitive (ssm_lab/ops/pallas/scan_primitive.py) and GPU lowering.


def _sequential_recurrence(a, b, axis, reverse):
  a = np.moveaxis(np.asarray(a, np.float64), axis, 0)
  b = np.moveaxis(np.asarray(b, np.float64), axis, 0)
  p, h = np.empty_like(a), np.empty_like(b)
  pc, hc = np.ones(a.shape[1:]), np.zeros(a.shape[1:])
  for t in (reversed(range(a.shape[0])) if reverse else range(a.shape[0])):
    pc, hc = pc * a[t], a[t] * hc + b[t]
    p[t], h[t] = pc, hc
  return np.moveaxis(p, 0, axis), np.moveaxis(h, 0, axis)


@pytest.mark.parametrize("axis,reverse", [(0, False), (0, True), (1, False), (2, True)])
def test_linear_recurrence_matches_a_sequential_loop(axis, reverse):
  ka, kb = jax.random.split(jax.random.PRNGKey(axis + 3 * reverse))
  a = jax.random.uniform(ka, (8, 4, 2), minval=0.2, maxval=1.1)
  b = jax.random.normal(kb, (8, 4, 2))
  p_ref, h_ref = _sequential_recurrence(a, b, axis, reverse)
  p, h = jax.jit(lambda a, b: linear_recurrence(a, b, axis=axis, reverse=reverse))(a, b)
  np.testing.assert_allclose(p, p_ref, rtol=1e-5)
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("unroll", [64, 2])
def test_segment_hand_over_matches_a_sequential_loop(reverse, unroll, monkeypatch):
  # unroll 64: one unrolled XLA expression; 2: fewer than the 6 segments, so the associative scan.
  monkeypatch.setattr(pss_wrapper, "_UNROLL_SEGMENTS", unroll)
  b, P, n, d = 2, 6, 3, 5
  ka, kl, kd, ke = jax.random.split(jax.random.PRNGKey(7 + reverse), 4)
  a = -jax.random.uniform(ka, (n, d), minval=0.1, maxval=2.0)
  loc = jax.random.normal(kl, (b, P - 1, n, d))
  dts = jax.random.uniform(kd, (b, P - 1, d), maxval=1.5)
  edge = jax.random.normal(ke, (b, n, d))
  x = jax.jit(lambda *args: pss_wrapper._hand_over(*args, reverse=reverse))(a, loc, dts, edge)
  decay = np.exp(np.asarray(a)[None, None] * np.asarray(dts)[:, :, None, :])
  want = np.zeros((b, P, n, d))
  if reverse:
    want[:, P - 1] = edge
    for p in reversed(range(P - 1)):
      want[:, p] = decay[:, p] * want[:, p + 1] + loc[:, p]
  else:
    want[:, 0] = edge
    for p in range(P - 1):
      want[:, p + 1] = decay[:, p] * want[:, p] + loc[:, p]
  np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)


def test_linear_recurrence_inside_an_interpreted_kernel_and_its_errors():
  a = jax.random.uniform(jax.random.PRNGKey(0), (16, 8), minval=0.5, maxval=1.0)
  b = jax.random.normal(jax.random.PRNGKey(1), (16, 8))

  def kernel(a_ref, b_ref, p_ref, h_ref):
    p_ref[...], h_ref[...] = linear_recurrence(a_ref[...], b_ref[...], axis=0, reverse=True)

  shape = jax.ShapeDtypeStruct(a.shape, jnp.float32)
  p, h = pl.pallas_call(kernel, out_shape=[shape, shape], interpret=True)(a, b)
  p_ref, h_ref = _sequential_recurrence(a, b, 0, True)
  np.testing.assert_allclose(p, p_ref, rtol=1e-5)
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="same shape|one shape"):
    linear_recurrence(a, b[:8])
  with pytest.raises(ValueError, match="float32"):
    linear_recurrence(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
  assert scan_primitive.lowers_reverse()


def _lower_for_h100(fn, *args) -> str:
  return lower_for_gpu(fn, *args, gpu="H100")


@pytest.mark.parametrize("extra,bwd_warps", [
    ({}, 1),                                              # the default (v6 at d_state 16)
    (dict(kernels="v4"), 4),
    # v4 with the backward on wider blocks and more warps.
    (dict(kernels="v4", chunk=8, bwd_block_d=16, bwd_num_warps=16), 16)])
def test_kernels_lower_for_the_gpu(extra, bwd_warps, monkeypatch):
  """Forward and backward lower to Triton for an H100 (segments > 1: all four kernels)."""
  monkeypatch.setattr(pss_wrapper, "interpret_mode", lambda: False)
  b, L, d, n = 2, 512, 64, 16
  sds = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)   # noqa: E731
  args = (sds(b, L, d), sds(b, L, d), sds(d, n, dt=jnp.float32), sds(b, L, 1, n), sds(b, L, 1, n),
          sds(d, dt=jnp.float32), sds(b, L, d), sds(d, dt=jnp.float32))
  cfg = pss.Config(segments=2, **extra)

  def loss(u, dl, A, B, C, D, z, bias):
    y = pss.selective_scan_pallas(u, dl, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                  config=cfg)
    return jnp.sum(y.astype(jnp.float32))

  txt = _lower_for_h100(jax.grad(loss, argnums=tuple(range(8))), *args)
  assert txt.count("__gpu$xla.gpu.triton") == 4
  bwd = [line for line in txt.splitlines() if 'name = "selective_scan_bwd"' in line]
  assert len(bwd) == 1 and f"num_warps = {bwd_warps} : i32" in bwd[0]
