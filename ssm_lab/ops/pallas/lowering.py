"""Lowering Pallas GPU kernels on a machine without a GPU (a developer's check, used by the tests).

`lower_for_gpu(fn, *args)` traces `fn` and lowers it for CUDA as if an H100 were attached, returning
the StableHLO text, in which each Pallas-Triton kernel appears as one `__gpu$xla.gpu.triton` custom
call carrying its Triton IR. This proves a kernel lowers (shapes, layouts, supported primitives)
before any device time is spent; without the plugin, compiling that IR to SASS happens on the GPU.

It stands in a GPU description for Pallas's device query, which is internal API of the pinned
jax 0.11.2 (`jax._src.pallas.triton`): this module is the one place that touches it.

`compile_deviceless(fn, *args)` goes one step further where the CUDA plugin of the same jaxlib is
importable (jax-cuda12-plugin and jax-cuda12-pjrt 0.11.2 on the path, with
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1): it compiles `fn` with XLA's own GPU compiler for a described
H100 or H200 (a deviceless topology), Triton kernels included, so the SASS the device would run can
be read without one (`benchmarks/offline_sass.py`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax

TRITON_CALL = "__gpu$xla.gpu.triton"

# XLA GPU TargetConfig text for a deviceless topology: the device description XLA would query
# (Hopper SXM: 132 SMs, 228 KB shared memory an SM, 64K registers, 50 MB L2).
_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 12
  minor: 8
}}
device_description_str: "{name}"
"""
TARGET_CONFIGS = {
    "H100": _TARGET.format(bandwidth=3352320000000, memory=85520809984,
                           name="NVIDIA H100 80GB HBM3"),
    "H200": _TARGET.format(bandwidth=4800000000000, memory=150754820096, name="NVIDIA H200"),
}


@contextlib.contextmanager
def _pretend_gpu(gpu: str):
  """Pallas's Triton lowering asks the attached GPU for its version: answer for `gpu` instead."""
  from jax._src.pallas.triton import gpu_info as gi  # noqa: PLC0415
  from jax._src.pallas.triton import pallas_call_registration as pcr  # noqa: PLC0415
  try:
    version = gi.GpuVersion[gpu]
  except KeyError:
    raise ValueError(f"gpu={gpu!r}: not one of {[v.name for v in gi.GpuVersion]}") from None
  saved = pcr.gpu_info_lib.get_gpu_info
  pcr.gpu_info_lib.get_gpu_info = lambda: gi.get_gpu_info_from_version(version)
  try:
    yield
  finally:
    pcr.gpu_info_lib.get_gpu_info = saved


def lower_for_gpu(fn: Callable[..., Any], *args: Any, gpu: str = "H100") -> str:
  """StableHLO text of `jax.jit(fn)` lowered for CUDA on a pretend `gpu` ("H100", "H200", "A100").

  Kernels inside `fn` must be built with interpret=False (on CPU the ops pick interpret mode:
  monkeypatch their module's `interpret_mode` to return False)."""
  with _pretend_gpu(gpu):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def compile_deviceless(fn: Callable[..., Any], *args: Any, gpu: str = "H100") -> Any:
  """`jax.jit(fn)` compiled by XLA's GPU compiler for a described `gpu` ("H100" or "H200") on a
  machine without one. args: arrays or ShapeDtypeStructs (only shapes and dtypes are used).

  Needs the CUDA plugin of the installed jaxlib importable (module docstring); raises RuntimeError
  naming what is missing otherwise. Kernels must be built with interpret=False (as for
  `lower_for_gpu`). Returns the compiled executable (`jax.stages.Compiled`)."""
  from jax.experimental import topologies  # noqa: PLC0415
  from jax.sharding import SingleDeviceSharding  # noqa: PLC0415
  if gpu not in TARGET_CONFIGS:
    raise ValueError(f"gpu={gpu!r}: not one of {sorted(TARGET_CONFIGS)}")
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=TARGET_CONFIGS[gpu],
                                        topology="1x1x1")
  except Exception as e:  # noqa: BLE001  (the plugin's errors are plain RuntimeErrors)
    raise RuntimeError(
        "no deviceless CUDA topology: put jax-cuda12-plugin and jax-cuda12-pjrt "
        f"{jax.__version__} on the path and set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 ({e})") from e
  sharding = SingleDeviceSharding(topo.devices[0])
  structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
  with _pretend_gpu(gpu):
    return jax.jit(fn).lower(*structs).compile()
