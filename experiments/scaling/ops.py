"""Ops units of the scaling study: forward+backward time and memory of one layer's sequence mixer
against sequence length, at a fixed number of tokens per batch (batch 1 once a sequence holds them).

Layer shapes (d_model 1024, bfloat16 inputs, float32 state and accumulation inside the ops):
  attention   16 heads x 64, causal; optionally a sliding window of 1024
  Mamba scan  d_inner 2048, d_state 16 (selective_scan: u, delta, z [b, L, 2048]; B, C [b, L, 16])
  SSD         32 heads x 64, d_state 128, one B/C group (ssd: x [b, L, 32, 64]; B, C [b, L, 1, 128])

Each length runs in a child process with a time limit (`python ops.py --child OP IMPL --length L
--shape JSON`, child.py), is compiled once (`jax.jit(...).lower(...).compile()`) and timed both
synchronised and pipelined (ssm_lab.timing). Memory is XLA's memory analysis of the compiled program (arguments +
outputs + temporaries), which needs no device counters and is the same on every backend.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab import timing
from ssm_lab.experiments import load_file

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")  # run_point, emit

TOKENS = 32_768
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
SMOKE_LENGTHS = (64, 128, 256)
SMOKE_TOKENS = 512
# (op, impl, sliding window) per unit; run names are ops-<op>-<impl>[-w<window>].
UNITS = (("attention", "xla", None), ("attention", "cudnn", None), ("attention", "pallas", None),
         ("attention", "cudnn", 1024), ("attention", "pallas", 1024),
         ("scan", "associative", None), ("scan", "pallas", None),
         ("ssd", "chunked", None), ("ssd", "pallas", None))
SHAPES = dict(attention=dict(heads=16, head_dim=64), scan=dict(d_inner=2048, d_state=16),
              ssd=dict(heads=32, head_dim=64, d_state=128))
SMOKE_SHAPES = dict(attention=dict(heads=2, head_dim=16), scan=dict(d_inner=32, d_state=4),
                    ssd=dict(heads=2, head_dim=16, d_state=8))
# The xla attention materialises float32 logits [b, heads, L, L]; skip lengths where they alone
# (forward, backward keeps them too) would pass this many bytes.
XLA_LOGITS_LIMIT = 24 * 2**30


def _inputs(op: str, batch: int, length: int, shape: dict[str, int], dtype: Any) -> tuple:
  rng = np.random.default_rng(0)
  r = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s, np.float32) * scale, dtype)
  if op == "attention":
    h, d = shape["heads"], shape["head_dim"]
    return tuple(r(batch, length, h, d) for _ in range(3))
  if op == "scan":
    c, n = shape["d_inner"], shape["d_state"]
    a = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (c, n))
    return (r(batch, length, c), r(batch, length, c, scale=0.5), a, r(batch, length, n),
            r(batch, length, n), r(batch, length, c))
  h, p, n = shape["heads"], shape["head_dim"], shape["d_state"]
  return (r(batch, length, h, p), r(batch, length, h, scale=0.5), -jnp.ones((h,), jnp.float32),
          r(batch, length, 1, n), r(batch, length, 1, n))


def _loss(op: str, impl: str, window: int | None) -> Callable[..., jax.Array]:
  from ssm_lab.ops import attention, selective_scan, ssd  # noqa: PLC0415

  if op == "attention":
    def f(q, k, v):
      return attention(q, k, v, causal=True, sliding_window=window, impl=impl)
  elif op == "scan":
    def f(u, delta, a, b, c, z):
      return selective_scan(u, delta, a, b, c, z=z, delta_softplus=True, impl=impl)
  else:
    def f(x, dt, a, b, c):
      return ssd(x, dt, a, b, c, dt_softplus=True, impl=impl)
  return lambda *args: jnp.sum(f(*args).astype(jnp.float32))


def _flops(op: str, batch: int, length: int, shape: dict[str, int], window: int | None) -> float:
  """Forward+backward FLOPs of attention's two matmuls (causal or windowed: visible pairs only,
  backward 2.5x forward, the FlashAttention convention); None for the scans."""
  if op != "attention":
    return float("nan")
  w = min(window or length, length)
  pairs = length * w - w * (w - 1) / 2  # visible (query, key) pairs of a causal window w
  return 3.5 * 4 * batch * shape["heads"] * shape["head_dim"] * pairs


def measure(op: str, impl: str, length: int, *, tokens: int = TOKENS, window: int | None = None,
            shape: dict[str, int] | None = None, dtype: Any = jnp.bfloat16,
            reps: int = 10) -> dict[str, Any]:
  """One point: {"ms_sync", "ms_pipelined", "memory_bytes", ...} or {"error": why}."""
  shape = shape or SHAPES[op]
  batch = max(1, tokens // length)
  row: dict[str, Any] = {"op": op, "impl": impl, "window": window, "length": length, "batch": batch,
                         "tokens": batch * length}
  if op == "attention" and impl == "xla" and 4 * batch * shape["heads"] * length ** 2 > \
      XLA_LOGITS_LIMIT:
    return dict(row, error=f"skipped: float32 logits over {XLA_LOGITS_LIMIT / 2**30:.0f} GiB")
  args = _inputs(op, batch, length, shape, dtype)
  loss = _loss(op, impl, window)
  argnums = tuple(range(len(args))) if op == "attention" else (0, 1, 3, 4)
  fn = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  try:
    t0 = time.perf_counter()
    exe = fn.lower(*args).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    mem = exe.memory_analysis()
    if mem is not None:
      row["memory_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                + mem.temp_size_in_bytes)
      row["temp_bytes"] = int(mem.temp_size_in_bytes)
    row["ms_sync"], row["ms_sync_min"] = timing.synchronised(exe, args, reps=reps)
    row["ms_pipelined"] = timing.pipelined(exe, args, reps=reps)
  except Exception as err:  # noqa: BLE001  (an impl that cannot serve a length is a result)
    return dict(row, error=f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}")
  row["ms_per_sequence"] = row["ms_pipelined"] / batch
  flops = _flops(op, batch, length, shape, window)
  if math.isfinite(flops):
    row["tflops_per_s"] = flops / (row["ms_pipelined"] * 1e-3) / 1e12
  return row


def sweep(op: str, impl: str, window: int | None = None, smoke: bool = False,
          budget_s: float = 420.0, point_timeout_s: float = 150.0) -> dict[str, Any]:
  """Every length of one (op, impl): a measurement unit's metrics. Each length runs in a child
  process limited to `point_timeout_s` (on 2026-12-07 the Pallas scan stalled at 64K and took the
  unit's six finished lengths with it); after a timeout, and once `budget_s` is spent, the longer
  lengths are listed as skipped."""
  lengths, tokens = (SMOKE_LENGTHS, SMOKE_TOKENS) if smoke else (LENGTHS, TOKENS)
  shape = (SMOKE_SHAPES if smoke else SHAPES)[op]
  t0, points, stop = time.perf_counter(), [], None
  for length in lengths:
    if stop is None and time.perf_counter() - t0 > budget_s:
      stop = "skipped: unit budget spent"
    if stop is not None:
      points.append({"length": length, "error": stop})
      continue
    args = ["--child", op, impl, "--length", str(length), "--tokens", str(tokens), "--shape",
            json.dumps(shape), "--reps", str(3 if smoke else 10)]
    if window is not None:
      args += ["--window", str(window)]
    if smoke:
      args += ["--float32"]
    point = load_file(CHILD).run_point(__file__, args, point_timeout_s)
    if "error" in point:
      point = {"op": op, "impl": impl, "window": window, "length": length, **point}
      if point.pop("timed_out", False):
        stop = f"skipped: L={length} timed out"
    print(f"  {op}/{impl}{'' if window is None else f'/w{window}'} L={length}: "
          f"{point.get('ms_pipelined', point.get('error'))}", flush=True)
    points.append(point)
  return {"op": op, "impl": impl, "window": window, "shape": shape, "tokens_per_batch": tokens,
          "dtype": "float32" if smoke else "bfloat16", "points": points,
          "growth_exponent": growth_exponent(points)}


def growth_exponent(points: list[dict[str, Any]], min_length: int = 2048) -> float | None:
  """Least-squares slope of log(ms per sequence) on log(length) over lengths >= `min_length` (the
  shorter ones are launch-bound): 2 for quadratic attention, 1 for a linear scan."""
  xy = [(math.log(p["length"]), math.log(p["ms_per_sequence"])) for p in points
        if "ms_per_sequence" in p and p["length"] >= min_length and p["ms_per_sequence"] > 0]
  if len(xy) < 2:
    xy = [(math.log(p["length"]), math.log(p["ms_per_sequence"])) for p in points
          if p.get("ms_per_sequence", 0) > 0]
  if len(xy) < 2:
    return None
  return float(np.polyfit(*zip(*xy, strict=True), 1)[0])


def crossover(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float | None:
  """The length (log-log interpolated) from which series `b` is faster than `a` for good, or None
  when it never is among the common lengths."""
  ta = {p["length"]: p["ms_pipelined"] for p in a if "ms_pipelined" in p}
  tb = {p["length"]: p["ms_pipelined"] for p in b if "ms_pipelined" in p}
  common = sorted(set(ta) & set(tb))
  if not common or tb[common[-1]] >= ta[common[-1]]:
    return None
  ratio = [math.log(tb[n] / ta[n]) for n in common]
  i = len(common) - 1
  while i > 0 and ratio[i - 1] < 0:
    i -= 1
  if i == 0:
    return float(common[0])
  x0, x1 = math.log(common[i - 1]), math.log(common[i])
  return float(math.exp(x0 + (x1 - x0) * ratio[i - 1] / (ratio[i - 1] - ratio[i])))


def main() -> int:
  p = argparse.ArgumentParser(description="one point of an ops unit (prints its JSON)")
  p.add_argument("--child", nargs=2, metavar=("OP", "IMPL"), required=True)
  p.add_argument("--length", type=int, required=True)
  p.add_argument("--tokens", type=int, default=TOKENS)
  p.add_argument("--shape", required=True, help="JSON dict of the op's shape")
  p.add_argument("--window", type=int, default=None)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--float32", action="store_true", help="float32 inputs (default bfloat16)")
  a = p.parse_args()
  op, impl = a.child
  load_file(CHILD).emit(measure(op, impl, a.length, tokens=a.tokens, window=a.window,
                                shape=json.loads(a.shape),
                                dtype=jnp.float32 if a.float32 else jnp.bfloat16, reps=a.reps))
  return 0


if __name__ == "__main__":
  sys.exit(main())
