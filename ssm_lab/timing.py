"""Two ways to time a compiled program, shared by the kernel benchmarks and the scaling study.

- `synchronised`: each call is waited for (block_until_ready) before the next starts. The time
  includes the host's dispatch of the call and the round trip that tells it the call finished; on
  our H200 that is about 0.3 ms per call for a program of ~20 kernels (benchmarks/results/
  ssd_h200_*.md: synchronised minus pipelined).
- `pipelined`: `reps` calls are dispatched back to back and waited for once, so the host runs ahead
  of the device as in a training loop; time per call = total / reps. This is the device's time per
  call (plus any gap the device waits on the host).

Both are medians or totals of wall-clock time; neither uses a profiler.
"""
from __future__ import annotations

import statistics
import time

import jax


def synchronised(exe, args, reps: int, warmup: int = 2) -> tuple[float, float]:
  """(median, min) wall ms of exe(*args), each call waited for, after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(exe(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(exe(*args))
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times), min(times)


def pipelined(exe, args, reps: int) -> float:
  """Wall ms per call of `reps` calls dispatched back to back and waited for once (after one
  warm-up call)."""
  jax.block_until_ready(exe(*args))
  t = time.perf_counter()
  out = None
  for _ in range(reps):
    out = exe(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) * 1e3 / reps
