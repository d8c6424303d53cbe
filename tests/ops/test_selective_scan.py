"""selective_scan: every impl against the token-by-token reference (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import ops
from ssm_lab.ops.selective_scan import REGISTRY


def make_inputs(key, batch=2, length=19, d_inner=8, d_state=4, groups=None, dtype=jnp.float32):
  ks = jax.random.split(key, 9)
  bc_shape = (batch, length, d_state) if groups is None else (batch, length, groups, d_state)
  return dict(
      u=jax.random.normal(ks[0], (batch, length, d_inner), dtype),
      delta=jax.random.normal(ks[1], (batch, length, d_inner), dtype) * 0.5,
      A=-jnp.exp(jax.random.normal(ks[2], (d_inner, d_state))),
      B=jax.random.normal(ks[3], bc_shape, dtype),
      C=jax.random.normal(ks[4], bc_shape, dtype),
      D=jax.random.normal(ks[5], (d_inner,)),
      z=jax.random.normal(ks[6], (batch, length, d_inner), dtype),
      delta_bias=jax.random.normal(ks[7], (d_inner,)) * 0.1,
      initial_state=jax.random.normal(ks[8], (batch, d_inner, d_state)),
  )


def naive(u, delta, A, B, C, D, z, delta_bias, initial_state):
  """Float64 NumPy loop straight from the contract's equations."""
  u, delta, A, B, C, D, z, db, h = (np.asarray(x, np.float64) for x in
                                    (u, delta, A, B, C, D, z, delta_bias, initial_state))
  delta = np.log1p(np.exp(delta + db))
  if B.ndim == 3:
    B, C = B[:, :, None], C[:, :, None]
  rep = u.shape[-1] // B.shape[2]
  B, C = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)
  ys = []
  for t in range(u.shape[1]):
    h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t]
    ys.append(np.sum(h * C[:, t], -1))
  y = np.stack(ys, 1) + u * D
  return y * z / (1 + np.exp(-z)), h


@pytest.mark.parametrize("groups", [None, 1, 2])
def test_reference_matches_float64_equations(groups):
  x = make_inputs(jax.random.PRNGKey(0), groups=groups)
  y, h = ops.selective_scan(**x, delta_softplus=True, return_final_state=True, impl="reference")
  y_np, h_np = naive(**x)
  np.testing.assert_allclose(y, y_np, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(h, h_np, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["associative", "auto"])
@pytest.mark.parametrize("groups,with_optional", [(None, True), (2, True), (None, False)])
def test_impl_matches_reference_values_and_gradients(impl, groups, with_optional):
  x = make_inputs(jax.random.PRNGKey(1), groups=groups)
  if not with_optional:
    for k in ("D", "z", "delta_bias", "initial_state"):
      x.pop(k)
  kw = dict(delta_softplus=True, return_final_state=True)

  def loss(impl_name, args):
    y, h = ops.selective_scan(**args, **kw, impl=impl_name)
    w = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * w) + jnp.sum(jnp.cos(h))

  ref_val, ref_grads = jax.value_and_grad(loss, argnums=1)("reference", x)
  val, grads = jax.value_and_grad(loss, argnums=1)(impl, x)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for name in x:
    np.testing.assert_allclose(grads[name], ref_grads[name], rtol=2e-4, atol=2e-4, err_msg=name)


def test_bfloat16_inputs_give_bfloat16_output_close_to_float32():
  x = make_inputs(jax.random.PRNGKey(2), dtype=jnp.bfloat16)
  y = ops.selective_scan(**x, delta_softplus=True, impl="associative")
  assert y.dtype == jnp.bfloat16
  x32 = {k: v.astype(jnp.float32) for k, v in x.items()}
  y32 = ops.selective_scan(**x32, delta_softplus=True, impl="reference")
  rel = jnp.linalg.norm(y.astype(jnp.float32) - y32) / jnp.linalg.norm(y32)
  assert rel < 1e-2


def test_final_state_continues_the_scan():
  """Scanning [0, t) then [t, L) from the carried state equals one scan over [0, L)."""
  x = make_inputs(jax.random.PRNGKey(3), length=20)
  x.pop("initial_state")
  full = ops.selective_scan(**x, delta_softplus=True, impl="reference")
  cut = lambda k, sl: x[k][:, sl]
  first = {k: (cut(k, slice(0, 8)) if x[k].ndim == 3 else x[k]) for k in x}
  second = {k: (cut(k, slice(8, None)) if x[k].ndim == 3 else x[k]) for k in x}
  y1, h = ops.selective_scan(**first, delta_softplus=True, return_final_state=True,
                             impl="associative")
  y2 = ops.selective_scan(**second, delta_softplus=True, initial_state=h, impl="associative")
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field,bad,match", [
    ("u", jnp.zeros((2, 19)), "u must be"),
    ("delta", jnp.zeros((2, 18, 8)), "delta must have shape"),
    ("A", jnp.zeros((7, 4)), "A must have shape"),
    ("B", jnp.zeros((2, 19, 3, 4)), "n_groups"),
    ("C", jnp.zeros((2, 19, 5)), "C must have shape"),
    ("D", jnp.zeros((9,)), "D must have shape"),
    ("initial_state", jnp.zeros((2, 8, 5)), "initial_state must have shape"),
    ("u", jnp.zeros((2, 19, 8), jnp.int32), "float32 or bfloat16"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(field, bad, match):
  x = make_inputs(jax.random.PRNGKey(4))
  x[field] = bad
  with pytest.raises(ValueError, match=match):
    ops.selective_scan(**x)


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="impl='fast'"):
    ops.selective_scan(**make_inputs(jax.random.PRNGKey(5)), impl="fast")


def test_auto_never_picks_the_reference():
  assert "reference" not in REGISTRY.auto_order("cpu")
  assert REGISTRY.auto_order("cpu")[0] == "associative"
