"""One op, several implementations: the registry behind every `impl=` switch.

Each sequence-mixing op (selective_scan, attention, ssd, ...) owns an `OpRegistry`. Implementations
register with a `supports` predicate that returns None when they can compute a given call exactly as
the contract says, or a sentence saying why not. `impl="auto"` takes the supported implementation with
the highest priority for the current backend; asking for an implementation by name that cannot serve
the call raises `ValueError` with that sentence, so no impl ever silently computes something else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Impl:
  """One implementation of an op.

  Attributes:
    name: the `impl=` string that selects it.
    fn: the implementation; called with the op's full keyword signature.
    supports: `supports(**call) -> None | str`; None when it computes this call, else the reason.
    auto_priority: backend ("cpu", "gpu", "tpu") -> priority under `impl="auto"`; a backend that is
      not listed never gets this impl automatically (it can still be asked for by name).
  """

  name: str
  fn: Callable[..., Any]
  supports: Callable[..., str | None]
  auto_priority: dict[str, int]


class OpRegistry:
  """The implementations of one op and the rule that picks among them."""

  def __init__(self, op_name: str):
    self.op_name = op_name
    self._impls: dict[str, Impl] = {}

  def register(self, impl: Impl) -> Impl:
    self._impls[impl.name] = impl
    return impl

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._impls)

  def get(self, name: str) -> Impl:
    return self._impls[name]

  def resolve(self, impl: str, backend: str | None = None, **call: Any) -> Impl:
    """Returns the implementation that serves `call` under the name `impl`.

    Raises:
      ValueError: unknown name, or a named impl that does not support the call, or no impl at all.
    """
    backend = backend or jax.default_backend()
    if impl == "auto":
      candidates = sorted(
          (i for i in self._impls.values() if backend in i.auto_priority),
          key=lambda i: -i.auto_priority[backend])
      reasons = []
      for cand in candidates:
        why = cand.supports(**call)
        if why is None:
          return cand
        reasons.append(f"{cand.name}: {why}")
      raise ValueError(f"{self.op_name}(impl='auto'): no implementation supports this call on "
                       f"backend {backend!r} ({'; '.join(reasons) or 'none registered'})")
    if impl not in self._impls:
      raise ValueError(f"{self.op_name}: impl={impl!r} is not one of "
                       f"{sorted(self._impls) + ['auto']}")
    chosen = self._impls[impl]
    why = chosen.supports(**call)
    if why is not None:
      raise ValueError(f"{self.op_name}(impl={impl!r}) does not support this call: {why}")
    return chosen

  def auto_order(self, backend: str | None = None) -> list[str]:
    """The names `impl="auto"` tries on `backend`, best first (for docs and tests)."""
    backend = backend or jax.default_backend()
    cands = [i for i in self._impls.values() if backend in i.auto_priority]
    return [i.name for i in sorted(cands, key=lambda i: -i.auto_priority[backend])]


def always(**_: Any) -> None:
  """A `supports` predicate for implementations that serve every valid call."""
  return None


FLOAT_DTYPES = ("float32", "bfloat16")


def check_float(name: str, x: Any) -> None:
  """Raises ValueError unless `x` is a float32 or bfloat16 array."""
  if x.dtype.name not in FLOAT_DTYPES:
    raise ValueError(f"{name} must be float32 or bfloat16, got dtype {x.dtype.name} "
                     f"(shape {tuple(x.shape)})")


def check_shape(name: str, x: Any, expected: tuple[int, ...], what: str) -> None:
  """Raises ValueError naming `name` when `x.shape != expected`; `what` spells the expected layout."""
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def check_rank(name: str, x: Any, rank: int, what: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name} must be {what} (rank {rank}), got shape {tuple(x.shape)}")
