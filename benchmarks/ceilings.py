"""Measured ceilings that the benchmark tables divide by, looked up by the device they ran on.

Fractions of a ceiling only mean something against the chip that ran the code, and the lent
machine is sometimes an H100 and sometimes an H200 (same SMs and clocks, faster HBM3e). The
numbers are measurements of this workplace's machines, not datasheet figures:

- H100 80GB: 2.46 TB/s device-to-device copy and 736 TF/s dense bf16 matmul (the project brief).
- H200: 4.3 TB/s copy (8.6 GB read + written in 2.0 ms) and 769-798 TF/s bf16 matmul on random
  8192^3 operands (the device tool's KINDS.md, 2026-10-28 and 2026-11-04); we use 790.

Any other device (the CPU in smoke runs) gets the H100 numbers, flagged as `assumed`.
"""
from __future__ import annotations

from typing import NamedTuple


class Ceilings(NamedTuple):
  hbm_tb_s: float         # TB/s a copy kernel reaches (bytes read + written)
  matmul_tf_s: float      # TF/s of a large bf16 matmul
  source: str


H100 = Ceilings(2.46, 736.0, "H100 80GB, measured (project brief)")
H200 = Ceilings(4.3, 790.0, "H200, measured (device tool KINDS.md)")


def for_device(device_kind: str | None = None) -> Ceilings:
  """The ceilings of `device_kind` (default: the first JAX device's)."""
  if device_kind is None:
    import jax
    device_kind = jax.devices()[0].device_kind
  kind = device_kind.upper()
  if "H200" in kind:
    return H200
  if "H100" in kind:
    return H100
  return H100._replace(source=f"assumed H100 numbers (device {device_kind!r} has none of its own)")
