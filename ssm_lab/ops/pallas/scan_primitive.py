"""`linear_recurrence`: a first-order linear recurrence along one axis of a Pallas-Triton tile.

Given a, b of one shape and a static axis, it returns

  P_t = prod_{s <= t} a_s          and          h_t = a_t h_{t-1} + b_t   (h_{-1} = 0)

along that axis (with `reverse=True` the recurrence runs from the last index down:
P_t = prod_{s >= t} a_s, h_t = a_t h_{t+1} + b_t). Both are one inclusive scan of the pairs (a, b)
under the associative operator (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2) (the left element comes
first in scan order).

Pallas-Triton lowers `lax.cumsum` to Triton's `tt.scan` but has no rule for a general associative
scan, so this module defines a JAX primitive with:
  * an impl (and a generic MLIR lowering) through `jax.lax.associative_scan`, used outside kernels and
    in Pallas interpret mode (CPU);
  * a Pallas-Triton lowering that emits one `tt.scan` over both operands with the combine above.

INTERNAL API: the Triton rule registers itself through `jax._src.pallas.triton.lowering`
(`register_lowering`, `LoweringRuleContext`) and builds the op with `jax._src.lib.triton.dialect`
(`ScanOp(operands, axis, reverse)`, `scan_return`), all private to the pinned jax 0.11.2 / jaxlib. This
module is the only place in ssm_lab that touches them; if a jax upgrade breaks it, the fix is here.
The primitive has no differentiation or batching rules: it is meant for use inside kernels, whose
gradients are written by hand.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith as arith_dialect
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as triton_lowering

linear_recurrence_p = jax_core.Primitive("linear_recurrence")
linear_recurrence_p.multiple_results = True


def linear_recurrence(a: jax.Array, b: jax.Array, *, axis: int = 0,
                      reverse: bool = False) -> tuple[jax.Array, jax.Array]:
  """(P, h): prefix products of `a` and the recurrence h_t = a_t h_{t-1} + b_t along `axis`.

  Args:
    a, b: float32 arrays of the same shape (any rank).
    axis: the (static) axis the recurrence runs along.
    reverse: run from the last index towards the first (h_t = a_t h_{t+1} + b_t).

  Returns:
    (P, h), both shaped like `a`.
  """
  if a.shape != b.shape or a.dtype != b.dtype:
    raise ValueError(f"linear_recurrence: a and b must have one shape and dtype, got a {a.shape} "
                     f"{a.dtype} and b {b.shape} {b.dtype}")
  if a.dtype != jnp.float32:
    raise ValueError(f"linear_recurrence: a and b must be float32, got {a.dtype}")
  if not -a.ndim <= axis < a.ndim:
    raise ValueError(f"linear_recurrence: axis={axis} out of range for shape {a.shape}")
  return tuple(linear_recurrence_p.bind(a, b, axis=axis % a.ndim, reverse=bool(reverse)))


def _combine(left, right):
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def _impl(a, b, *, axis, reverse):
  p, h = jax.lax.associative_scan(_combine, (a, b), axis=axis, reverse=reverse)
  return [p, h]


def _abstract_eval(a, b, *, axis, reverse):
  del axis, reverse
  return [jax_core.ShapedArray(a.shape, a.dtype), jax_core.ShapedArray(b.shape, b.dtype)]


linear_recurrence_p.def_impl(_impl)
linear_recurrence_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(linear_recurrence_p, mlir.lower_fun(_impl, multiple_results=True))


@triton_lowering.register_lowering(linear_recurrence_p)
def _triton_lowering(ctx: triton_lowering.LoweringRuleContext, a, b, *, axis: int, reverse: bool):
  """One tt.scan over (a, b); the region's arguments are (a_left, b_left, a_right, b_right)."""
  del ctx
  f32 = ir.F32Type.get()
  scan = tt_dialect.ScanOp([a, b], axis, reverse)
  entry = scan.regions[0].blocks.append(f32, f32, f32, f32)
  with ir.InsertionPoint.at_block_begin(entry):
    a_l, b_l, a_r, b_r = entry.arguments
    prod = arith_dialect.mulf(a_l, a_r)
    rec = arith_dialect.addf(arith_dialect.mulf(a_r, b_l), b_r)
    tt_dialect.scan_return([prod, rec])
  scan.verify()
  return list(scan.result)


@functools.cache
def lowers_reverse() -> bool:
  """Whether the pinned Triton dialect's ScanOp takes `reverse` (checked by the tests)."""
  import inspect
  return "reverse" in inspect.signature(tt_dialect.ScanOp.__init__).parameters
