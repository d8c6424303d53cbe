"""The Pallas selective scan against the reference: values, final state and every gradient.

On CPU the kernels run in Pallas interpret mode (small shapes; each case compiles a few interpreted
kernels, so the cases are chosen to cover the kernel's branches once each: groups, channel and time
padding, d_state padding, time segments, no z / no initial state, softplus off, bf16). The GPU case is
marked `gpu` and runs through the device tool (benchmarks/selective_scan.py checks realistic shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab.ops import selective_scan
from ssm_lab.ops.pallas import selective_scan as pss
from ssm_lab.ops.selective_scan import REGISTRY

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
# is slow, so two cases cover the branches between them and a third, wider one runs nightly.
CASES = {
    # Two groups of 12 channels, each padded to 16 (block_d 8 -> two blocks per group); d_state 5
    # padded to 8; length 21 padded to 24 = 3 segments of 8 tokens, the padded tail inside the last
    # one (masked tokens); float32 B/C (unpacked); no z, no initial state, no softplus.
    "f32_groups_segments": ((1, 21, 24, 5, 2), jnp.float32,
                            dict(z=False, init=False, softplus=False),
                            pss.Config(block_d=8, chunk=2, unroll=2, segments=3), 1e-5),
    # bf16 activations with B/C given without the group axis (packed bf16 B/C), z gate, initial
    # state, softplus; one segment; channels 12 padded to 16; length 7 padded to 8.
    "bf16_z_init": ((2, 7, 12, 4, 1), jnp.bfloat16, dict(grouped_bc=False),
                    pss.Config(block_d=8, chunk=2, unroll=2, segments=1), 2e-2),
}
SLOW_CASES = {
    "f32_wide": ((2, 37, 24, 16, 2), jnp.float32, {},
                 pss.Config(block_d=8, chunk=2, unroll=4, segments=2), 1e-5),
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


def test_default_config_fills_the_gpu_and_respects_limits():
  cfg = pss.default_config(8, 2048, 1536, 16)
  assert cfg.block_d == 32 and cfg.unroll % cfg.chunk == 0
  # Long sequences with few channels are split into more time segments than wide calls, and
  # segments keep at least 256 tokens.
  long_narrow = pss.default_config(1, 65536, 2048, 16).segments
  assert long_narrow > pss.default_config(8, 2048, 5120, 16).segments >= 1
  assert 65536 // long_narrow >= 256 and pss.default_config(1, 300, 64, 16).segments == 1
  # Large d_state: lanes share a channel's states so that a lane keeps at most 16 of them.
  assert pss.default_config(2, 1024, 256, 64).block_d * 64 <= 512
  with pytest.raises(ValueError, match="multiple of Config.chunk"):
    pss.default_config(1, 64, 32, 16, config=pss.Config(chunk=4, unroll=6))


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
  """On the GPU: a Mamba-sized call (bf16, default tiling, segments) against the reference."""
  inp = _inputs(5, 2, 4096, 768, 16, 1, jnp.bfloat16)
  check_matches_reference(inp, True, None, 1e-2)
