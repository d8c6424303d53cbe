"""Lowering Pallas GPU kernels on a machine without a GPU (a developer's check, used by the tests).

`lower_for_gpu(fn, *args)` traces `fn` and lowers it for CUDA as if an H100 were attached, returning
the StableHLO text, in which each Pallas-Triton kernel appears as one `__gpu$xla.gpu.triton` custom
call carrying its Triton IR. This proves a kernel lowers (shapes, layouts, supported primitives)
before any device time is spent; compiling that IR to PTX/SASS still happens on the GPU.

It stands in a GPU description for Pallas's device query, which is internal API of the pinned
jax 0.11.2 (`jax._src.pallas.triton`): this module is the one place that touches it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_gpu(fn: Callable[..., Any], *args: Any, gpu: str = "H100") -> str:
  """StableHLO text of `jax.jit(fn)` lowered for CUDA on a pretend `gpu` ("H100", "H200", "A100").

  Kernels inside `fn` must be built with interpret=False (on CPU the ops pick interpret mode:
  monkeypatch their module's `interpret_mode` to return False)."""
  from jax._src.pallas.triton import gpu_info as gi  # noqa: PLC0415
  from jax._src.pallas.triton import pallas_call_registration as pcr  # noqa: PLC0415
  try:
    version = gi.GpuVersion[gpu]
  except KeyError:
    raise ValueError(f"gpu={gpu!r}: not one of {[v.name for v in gi.GpuVersion]}") from None
  saved = pcr.gpu_info_lib.get_gpu_info
  pcr.gpu_info_lib.get_gpu_info = lambda: gi.get_gpu_info_from_version(version)
  try:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    pcr.gpu_info_lib.get_gpu_info = saved
