"""Run one op's forward or forward+backward once between cudaProfilerStart/Stop, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
        python -m benchmarks.profile_kernels --op scan --shape 8x2048x1536x16 --mode fwdbwd

The program is compiled and run twice (warm-up) before the profiled range, so ncu sees only the
kernels of one call: Pallas kernels keep their `name=` (e.g. `selective_scan_bwd`), XLA's fusions
theirs. `--config` is a JSON object: `selective_scan` Config fields for `--op scan`, `ssd_pallas`
keyword arguments for `--op ssd`. `--op jla_scan` / `jla_ssd` run jax-linear-attention 0.1.0's
Mosaic GPU kernels on the same inputs (it must be importable). Without a GPU (or without ncu) the
script still runs the call, so it can be checked on CPU: `--op scan --shape 1x64x32x4`.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys

import jax
import jax.numpy as jnp


from benchmarks import selective_scan as scan_bench  # noqa: E402
from benchmarks import ssd as ssd_bench  # noqa: E402
from ssm_lab.ops.pallas import selective_scan as PSS  # noqa: E402


def _cudart():
  """libcudart (for cudaProfilerStart/Stop), or None where there is none (CPU)."""
  names = ["libcudart.so.12", "libcudart.so.13", "libcudart.so"]
  for base in sys.path:
    names += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
  for name in names:
    try:
      return ctypes.CDLL(name)
    except OSError:
      continue
  return None


def build(op: str, shape: tuple[int, ...], mode: str, config: dict, abstract: bool = False):
  """(jitted function, its arguments); `abstract`: the arguments as ShapeDtypeStructs, nothing
  computed (for compiling without running, benchmarks/offline_sass.py)."""
  made = (lambda thunk: jax.eval_shape(thunk)) if abstract else (lambda thunk: thunk())
  if op in ("scan", "jla_scan"):
    b, L, d, n = shape
    inp = made(lambda: scan_bench.make_inputs(2, b, L, d, n, 1, jnp.bfloat16))
    args = tuple(inp[k] for k in scan_bench.DIFF_ARGS)
    present = tuple(a is not None for a in args)
    impl = "jla" if op == "jla_scan" else "pallas"
    f = scan_bench.op_fn(impl, config=PSS.Config(**config) if op == "scan" else None)
    if mode == "fwd":
      return jax.jit(f), args
    ct = made(lambda: scan_bench._normal(9, (b, L, d), jnp.bfloat16))
    return jax.jit(scan_bench.fwd_bwd_fn(f, present)), (args, ct)
  if op in ("ssd", "jla_ssd"):
    b, L, h, p, n = shape
    a, dy = made(lambda: ssd_bench.make_inputs(jax.random.PRNGKey(0), b, L, h, p, n, 1,
                                               jnp.bfloat16))
    if op == "ssd":
      f = ssd_bench.ours("pallas", **config)
    else:
      from jla.ops import linear_attention  # noqa: PLC0415
      f = ssd_bench.jla_fn(linear_attention)
    fwd, fb = ssd_bench.fwd_and_fwdbwd(f)
    return (jax.jit(fwd), (a,)) if mode == "fwd" else (jax.jit(fb), (a, dy))
  raise ValueError(f"--op must be scan, jla_scan, ssd or jla_ssd, got {op!r}")


def parse_call(op: str, shape_s: str, config_s: str) -> tuple[tuple[int, ...], dict]:
  """(shape, config) from the --shape and --config flags, or exit naming the bad one."""
  try:
    shape = tuple(int(s) for s in shape_s.split("x"))
  except ValueError:
    shape = ()
  want = 4 if op.endswith("scan") else 5
  if len(shape) != want:
    raise SystemExit(f"--shape {shape_s!r}: {op} needs {want} sizes joined by 'x'")
  try:
    return shape, json.loads(config_s)
  except json.JSONDecodeError as e:
    raise SystemExit(f"--config is not JSON: {e}") from None


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--op", required=True, help="scan | jla_scan | ssd | jla_ssd")
  ap.add_argument("--shape", required=True,
                  help="scan: BxLxDxN (8x2048x1536x16); ssd: BxLxHxPxN (8x2048x24x64x128)")
  ap.add_argument("--mode", default="fwdbwd", choices=("fwd", "fwdbwd"))
  ap.add_argument("--config", default="{}", help="JSON: Config fields / ssd_pallas kwargs")
  ap.add_argument("--iters", type=int, default=1, help="profiled calls")
  opts = ap.parse_args()
  shape, config = parse_call(opts.op, opts.shape, opts.config)
  fn, args = build(opts.op, shape, opts.mode, config)
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  rt = _cudart() if jax.default_backend() == "gpu" else None
  if rt is not None:
    rt.cudaProfilerStart()
  for _ in range(opts.iters):
    jax.block_until_ready(fn(*args))
  if rt is not None:
    rt.cudaProfilerStop()
  print(f"profiled {opts.iters} call(s): {opts.op} {opts.mode} {shape} {config} "
        f"(profiler API {'on' if rt is not None else 'absent'})", flush=True)


if __name__ == "__main__":
  main()
