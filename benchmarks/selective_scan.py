"""Selective scan on the GPU: correctness at realistic shapes, then forward / forward+backward timings.

Run on the device machine (see benchmarks/NOTES_selective_scan.md for the numbers and their meaning):

  python -m benchmarks.selective_scan --out DIR              # checks, benchmark table, results files
  python -m benchmarks.selective_scan --out DIR --check-only # correctness only
  python -m benchmarks.selective_scan --out DIR --quick      # one benchmark shape, fewer repetitions
  python -m benchmarks.selective_scan --out DIR --sweep      # also time Pallas tiling variants
                                                             # (--variants is the same flag)

Impls: "reference" (lax.scan; timed only with --time-reference, always the correctness oracle),
"associative", "pallas" (ssm_lab.ops.pallas.selective_scan, default config: v6 at d_state <= 16),
"pallas:v4" (the time-parallel v4 kernels, `Config(kernels="v4")`, timed side by side) and,
when importable, jax-linear-attention 0.1.0's Mosaic GPU kernel ("jla"). Every call is the typical Mamba
block call: D skip, z gate, delta_bias and softplus, bf16 activations, n_groups 1. Timings are medians
of repeated runs after warm-up (jax.block_until_ready around each), on random inputs. Achieved HBM
bandwidth is counted against the bytes that must move: every input read once and every output written
once (forward: u, delta, z, B, C in, y out; forward+backward adds dy, u, delta, z, B, C in and du,
ddelta, dz, dB, dC out), over the measured 2.46 TB/s ceiling.

Order (so that a failing or stalling check cannot cost the table): lower every program (serial Python;
jla's Mosaic GPU kernels take tens of seconds each) while a thread pool compiles them; the small
checks; the timings of every shape and impl; the --sweep variants; then the checks at the benchmark
shapes, whose oracle is the plain lax.scan reference where it fits and otherwise the same reference
in rematerialised time pieces (`reference_pieces_fn`; the table names the oracle). Programs whose
XLA memory count exceeds the free device memory are skipped with that reason instead of run into an
OOM. Each check runs under a watchdog (--check-cap-s) that dumps every stack and ends the run; a
SIGTERM (timeout) dumps the stacks too. Every line is stamped with the seconds since start, and
selective_scan.json and selective_scan.md under --out are rewritten after every row; the table is
printed last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import faulthandler
import functools
import json
import os
import signal
import re
import time
import traceback
from typing import Any, Callable

import numpy as np


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HBM_BYTES_PER_S = 2.46e12        # copy ceiling of the chip that runs: set in main() (ceilings.py)
SHAPES = [(8, 2048, 1536, 16), (2, 8192, 1536, 16), (1, 65536, 2048, 16), (8, 2048, 5120, 16)]


import ssm_lab.ops.pallas.selective_scan as PSS  # noqa: E402
from ssm_lab.ops import selective_scan as selective_scan_op  # noqa: E402  (the function)
from ssm_lab.provenance import git_commit  # noqa: E402

from benchmarks import ceilings  # noqa: E402
from ssm_lab import timing  # noqa: E402



def _jla():
  try:
    import jla.ops  # noqa: F401
    return jla.ops, None
  except Exception as e:  # noqa: BLE001
    return None, f"{type(e).__name__}: {e}"


JLA, JLA_ERROR = _jla()


# ---------------------------------------------------------------------------------------------------
# Inputs and the functions under test.


def _make_inputs(seed: int, b: int, L: int, d: int, n: int, g: int = 1, dtype=jnp.bfloat16, *,
                init: bool = False, z: bool = True, positive_delta: bool = False) -> dict[str, Any]:
  """Mamba-like random inputs: A = -(1..n) (S4D-real), dt = softplus(delta + bias) ~ 1e-3..1e-1."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  u = jax.random.normal(ks[0], (b, L, d), jnp.float32)
  delta = 0.5 * jax.random.normal(ks[1], (b, L, d), jnp.float32)
  dt0 = jnp.exp(jax.random.uniform(ks[2], (d,), minval=np.log(1e-3), maxval=np.log(1e-1)))
  bias = jnp.log(jnp.expm1(dt0))
  if positive_delta:                        # for delta_softplus=False: delta + bias > 0 already
    delta, bias = jax.nn.softplus(delta - 4.0), dt0
  A = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)) * jnp.exp(
      0.1 * jax.random.normal(ks[3], (d, n)))
  out = dict(u=u.astype(dtype), delta=delta.astype(dtype), A=A,
             B=jax.random.normal(ks[4], (b, L, g, n)).astype(dtype),
             C=jax.random.normal(ks[5], (b, L, g, n)).astype(dtype),
             D=1.0 + 0.1 * jax.random.normal(ks[6], (d,)),
             z=jax.random.normal(ks[7], (b, L, d)).astype(dtype) if z else None,
             delta_bias=bias,
             initial_state=jax.random.normal(ks[8], (b, d, n)) if init else None)
  return out


_MAKE_INPUTS = jax.jit(_make_inputs, static_argnums=tuple(range(7)),
                       static_argnames=("init", "z", "positive_delta"))


def make_inputs(seed: int, b: int, L: int, d: int, n: int, g: int = 1, dtype=jnp.bfloat16, *,
                init: bool = False, z: bool = True, positive_delta: bool = False) -> dict[str, Any]:
  """`_make_inputs` as one compiled program (eager random ops compile one GPU program per op and
  shape; suspected of most of the ~170 s before compilation in the H100 run of commit 637a713)."""
  return _MAKE_INPUTS(seed, b, L, d, n, g, dtype, init=init, z=z, positive_delta=positive_delta)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _normal(seed: int, shape: tuple[int, ...], dtype) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)


DIFF_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def op_fn(impl: str, softplus: bool = True, final_state: bool = False,
          config: Any = None) -> Callable[..., Any]:
  """f(u, delta, A, B, C, D, z, delta_bias, initial_state) -> y (or (y, final_state))."""

  def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=softplus, initial_state=initial_state,
              return_final_state=final_state)
    if impl == "jla":
      o, h = JLA.linear_attention("mamba1", q=C[:, :, 0], k=B[:, :, 0], v=u, dt=delta, a=A, d=D, z=z,
                                  dt_bias=delta_bias, dt_softplus=softplus, initial_state=initial_state,
                                  output_final_state=final_state, impl="mosaic_gpu")
      return (o, h) if final_state else o
    if impl == "pallas:v4" and config is None:
      return PSS.selective_scan_pallas(u, delta, A, B, C, config=PSS.Config(kernels="v4"), **kw)
    if impl.startswith("pallas") and config is not None:
      return PSS.selective_scan_pallas(u, delta, A, B, C, config=config, **kw)
    return selective_scan_op(u, delta, A, B, C, impl=impl.split(":")[0], **kw)

  return f


def fwd_bwd_fn(f: Callable[..., Any], present: tuple[bool, ...]) -> Callable[..., Any]:
  """(args, cotangent) -> (outputs, gradients of the present differentiable args)."""

  def g(args, ct):
    def inner(*diff):
      it = iter(diff)
      full = [next(it) if p else None for p in present]
      return f(*full)
    diff = [a for a, p in zip(args, present, strict=True) if p]
    out, vjp = jax.vjp(inner, *diff)
    return out, vjp(ct)

  return g


def reference_pieces_fn(pieces: int, softplus: bool = True, final_state: bool = False
                        ) -> Callable[..., Any]:
  """The lax.scan reference over `pieces` equal time pieces, each rematerialised in the backward.

  Same values as op_fn("reference") (the state is carried from piece to piece through
  initial_state), but the backward keeps only one piece's per-step residuals live: the memory of
  the reference's fwd+bwd divided by about `pieces`. The oracle for shapes whose plain reference
  does not fit (e.g. (1, 65536, 2048, 16) wants 61 GiB on an 80 GB H100).
  """

  def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
    b, L, d = u.shape
    if L % pieces:
      raise ValueError(f"reference_pieces_fn: length {L} is not a multiple of pieces={pieces}")
    h0 = (jnp.zeros((b, d, A.shape[1]), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    def split(x):                           # [b, L, ...] -> [pieces, b, L / pieces, ...]
      return None if x is None else jnp.moveaxis(x.reshape(b, pieces, L // pieces, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def piece(h, xs):
      u_p, dl_p, b_p, c_p, z_p = xs
      y_p, h = selective_scan_op(u_p, dl_p, A, b_p, c_p, D=D, z=z_p, delta_bias=delta_bias,
                                 delta_softplus=softplus, initial_state=h, return_final_state=True,
                                 impl="reference")
      return h, y_p

    h_last, ys = jax.lax.scan(piece, h0, tuple(split(x) for x in (u, delta, B, C, z)))
    y = jnp.moveaxis(ys, 0, 1).reshape(u.shape)
    return (y, h_last) if final_state else y

  return f


def reference_bytes(b: int, L: int, d: int, n: int) -> float:
  """Predicted device bytes of the plain reference's fwd+bwd: ~7.6 float32 [b, L, d, n] arrays
  (per-step residuals and the broadcast B, C), calibrated on XLA's 61.0 GiB for (1, 65536, 2048, 16)
  in the H100 run of commit 637a713."""
  return 7.6 * b * L * d * n * 4


# ---------------------------------------------------------------------------------------------------
# Compilation and timing.

T0 = time.time()


def log(msg: str) -> None:
  """Prints with the seconds since the script started (the H100 log of 637a713 had no clock)."""
  print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def compile_all(jobs: dict[str, tuple[Callable[..., Any], tuple]], workers: int) -> dict[str, Any]:
  """Lowers each job here (Python, serial) and hands it to a thread pool to compile at once, so
  compilation (XLA and Triton release the GIL) overlaps the next lowering."""
  compiled: dict[str, Any] = {}
  t0 = time.time()

  def comp(name, low):
    t = time.time()
    try:
      return name, low.compile(), time.time() - t
    except Exception as e:  # noqa: BLE001  (record and go on: one failing case must not stop the rest)
      return name, e, time.time() - t

  futures = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for name, (fn, args) in jobs.items():
      t = time.time()
      try:
        low = jax.jit(fn).lower(*args)
      except Exception as e:  # noqa: BLE001
        compiled[name] = e
        log(f"  lower {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
        continue
      log(f"  lower {name}: {time.time() - t:.1f}s")
      futures.append(pool.submit(comp, name, low))
    for fut in concurrent.futures.as_completed(futures):
      name, exe, dt = fut.result()
      compiled[name] = exe
      status = "ok" if not isinstance(exe, Exception) else f"FAILED {type(exe).__name__}: {str(exe)[:300]}"
      log(f"  compile {name}: {dt:.1f}s {status}")
  log(f"lowered and compiled {len(jobs)} programs in {time.time() - t0:.1f}s")
  return compiled


def exe_bytes(exe) -> int | None:
  """Device bytes an execution allocates beyond its arguments (temporaries + outputs), per XLA."""
  try:
    m = exe.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes)
  except Exception:  # noqa: BLE001  (not every backend reports it)
    return None


def free_bytes() -> int | None:
  try:
    st = jax.devices()[0].memory_stats()
    return int(st["bytes_limit"] - st["bytes_in_use"])
  except Exception:  # noqa: BLE001  (CPU has no memory_stats)
    return None


def too_big(exe) -> str | None:
  """A reason to skip exe when XLA's own count of its bytes exceeds 90% of the free device memory
  (an OOM inside XLA's allocator is slow to report and can leave it fragmented)."""
  need, free = exe_bytes(exe), free_bytes()
  if need is None or free is None or need <= 0.9 * free:
    return None
  return f"skipped: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def time_exe(exe, args, reps: int) -> float:
  """Median wall ms of exe(*args), each call synchronised (ssm_lab/timing.py)."""
  return timing.synchronised(exe, args, reps, warmup=2 if reps > 3 else 1)[0]


@jax.jit
def _err_parts(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.linalg.norm(a - b), jnp.linalg.norm(b), jnp.all(jnp.isfinite(a))


def rel_err(a, b) -> float:
  """Relative Frobenius error, on the device (float32 sums: ~1e-6 relative, far below the
  tolerances; the float64 host copies of 637a713 cost seconds per array at the long shapes)."""
  num, den, finite = (float(x) for x in _err_parts(a, b))
  if not finite:
    return float("nan")
  return num / max(den, 1e-30)


def must_move_bytes(b, L, d, n, g, itemsize, backward: bool) -> int:
  tok, grp = b * L * d * itemsize, b * L * g * n * itemsize
  fwd = 4 * tok + 2 * grp                   # u, delta, z, y ; B, C
  return fwd + (7 * tok + 4 * grp if backward else 0)   # dy, u, delta, z -> du, ddelta, dz ; B, C -> dB, dC


# ---------------------------------------------------------------------------------------------------


def check_case(name, exe_p, exe_r, args_ref, ct, present, tol, cap_s: float,
               oracle: str = "reference") -> dict[str, Any]:
  """Compares the pallas executable's outputs and gradients with the oracle executable's.

  A watchdog dumps every thread's stack and ends the process if the check takes over cap_s (the
  results written so far stay on disk: they are saved after every row)."""
  res: dict[str, Any] = dict(case=name, tol=tol, oracle=oracle)
  t = time.time()
  faulthandler.dump_traceback_later(cap_s, exit=True)
  try:
    for label, exe in (("pallas", exe_p), ("oracle", exe_r)):
      if exe is None or isinstance(exe, Exception):
        raise RuntimeError(f"{label} program unavailable: {type(exe).__name__}: {str(exe)[:300]}")
      why = too_big(exe)
      if why:
        raise RuntimeError(f"{label} {why}")
    errs = {}
    out_p, grads_p = exe_p(args_ref, ct)
    outs_p = out_p if isinstance(out_p, tuple) else (out_p,)
    out_r, grads_r = exe_r(args_ref, ct)
    outs_r = out_r if isinstance(out_r, tuple) else (out_r,)
    for label, a, b in zip(("y", "final_state"), outs_p, outs_r, strict=False):
      errs[label] = rel_err(a, b)
    names = [k for k, p in zip(DIFF_ARGS, present, strict=True) if p]
    for k, a, b in zip(names, grads_p, grads_r, strict=True):
      errs["d" + k] = rel_err(a, b)
    del out_p, grads_p, out_r, grads_r, outs_p, outs_r
    res["errors"] = errs
    res["ok"] = all(np.isfinite(v) and v <= tol for v in errs.values())
  except Exception as e:  # noqa: BLE001
    res["ok"] = False
    res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    if not isinstance(e, RuntimeError):
      traceback.print_exc()
  finally:
    faulthandler.cancel_dump_traceback_later()
  res["wall_s"] = time.time() - t
  log(f"check {name} ({oracle}): {'OK' if res['ok'] else 'FAIL'} "
      + json.dumps({k: f'{v:.2e}' for k, v in res.get('errors', {}).items()})
      + (f" {res['error']}" if "error" in res else ""))
  return res


CHECKS = [
    # name, (b, L, d, n, g), dtype, init, z, softplus, tol
    ("f32_init_final", (2, 2048, 1536, 16, 1), jnp.float32, True, True, True, 1e-4),
    ("bf16_ragged_groups", (3, 1000, 1000, 12, 4), jnp.bfloat16, True, False, False, 1e-2),
    ("f32_dstate64", (2, 1024, 256, 64, 2), jnp.float32, True, True, True, 1e-4),
    ("bf16_long_segments", (1, 16384, 512, 16, 1), jnp.bfloat16, True, True, True, 1e-2),
]

# Plain-reference bytes above which a benchmark shape's check uses reference_pieces_fn (fits the
# 80 GB H100 with everything else the script holds; XLA's count is checked again before running).
ORACLE_BYTES = 16e9


def oracle_for(shape: tuple[int, int, int, int]) -> tuple[int, str]:
  """(pieces, description) of the oracle for a benchmark shape (pieces 1 = the plain reference)."""
  b, L, d, n = shape
  need = reference_bytes(b, L, d, n)
  pieces = 1
  while need / pieces > ORACLE_BYTES and L % (2 * pieces) == 0 and L // (2 * pieces) >= 128:
    pieces *= 2
  if pieces == 1:
    return 1, "reference"
  return pieces, (f"reference in {pieces} remat pieces (plain: ~{need / 2**30:.0f} GiB predicted)")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--check-only", action="store_true")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--sweep", "--variants", dest="sweep", action="store_true")
  ap.add_argument("--sweep-match", default="",
                  help="time only the sweep configs whose JSON matches this regular expression")
  ap.add_argument("--time-reference", action="store_true", help="also time the lax.scan oracle")
  ap.add_argument("--impls", default=None,
                  help="comma-separated impls to time (default: associative,pallas,pallas:v4,jla)")
  ap.add_argument("--no-jla", action="store_true")
  ap.add_argument("--no-shape-checks", action="store_true",
                  help="skip the (long) checks at the benchmark shapes")
  ap.add_argument("--workers", type=int, default=12)
  ap.add_argument("--budget-s", type=float, default=330.0,
                  help="stop timing new cases after this many seconds of timing (sweep: +30 s, "
                       "benchmark-shape checks: +90 s); building the programs comes first and is "
                       "not counted (jla's take ~10-35 s a shape to lower, one after another)")
  ap.add_argument("--check-cap-s", type=float, default=90.0,
                  help="a check running longer than this dumps all stacks and ends the run")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (to try the script on a CPU)")
  opts = ap.parse_args()
  # A `timeout` (SIGTERM) prints where every thread was before the process goes (use timeout -k).
  faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
  global SHAPES, CHECKS, SWEEP, ORACLE_BYTES
  if opts.smoke:
    SHAPES = [(2, 64, 64, 4), (1, 256, 32, 4)]
    CHECKS = [(n, (s[0], min(s[1], 50), min(s[2], 40), min(s[3], 5), 1 if s[4] == 1 else 2), *rest)
              for n, s, *rest in CHECKS[:2]]
    SWEEP = [((2, 64, 64, 4), dict(segments=2, chunk=8)),
             ((2, 64, 64, 4), dict(kernels="v4", segments=2, chunk=8))]
    SWEEP += [((2, 64, 64, 4), dict(bwd_num_warps=16, bwd_block_d=16))]   # a backward-only knob
    ORACLE_BYTES = 1e5                      # the second smoke shape takes the piecewise oracle
  os.makedirs(opts.out, exist_ok=True)
  t_start = T0
  dev = jax.devices()[0]
  global HBM_BYTES_PER_S
  HBM_BYTES_PER_S = ceilings.for_device(dev.device_kind).hbm_tb_s * 1e12
  commit = git_commit()
  meta = dict(device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
              date=datetime.date.today().isoformat(), commit=commit,
              jla=None if JLA is not None else JLA_ERROR, hbm_ceiling_bytes_per_s=HBM_BYTES_PER_S,
              free_bytes_at_start=free_bytes())
  log(json.dumps(meta))
  results: dict[str, Any] = dict(meta=meta, checks=[], bench=[], sweep=[])

  def save():
    with open(os.path.join(opts.out, "selective_scan.json"), "w") as fh:
      json.dump(results, fh, indent=1)
    _report(results, opts.out, echo=False)

  shapes = SHAPES[:1] if opts.quick else SHAPES
  use_jla = JLA is not None and not opts.no_jla
  jobs: dict[str, tuple[Callable[..., Any], tuple]] = {}
  data: dict[str, Any] = {}

  # Correctness at realistic shapes: outputs (y, final state) and all gradients vs the reference.
  for name, (b, L, d, n, g), dtype, init, z, sp, tol in CHECKS:
    inp = make_inputs(1, b, L, d, n, g, dtype, init=init, z=z, positive_delta=not sp)
    args = tuple(inp[k] for k in DIFF_ARGS)
    present = tuple(a is not None for a in args)
    ct = (_normal(7, (b, L, d), dtype), _normal(8, (b, d, n), jnp.float32))
    for impl in ("reference", "pallas"):
      jobs[f"{name}/{impl}"] = (fwd_bwd_fn(op_fn(impl, sp, final_state=True), present), (args, ct))
    data[name] = (args, ct, present, tol)
  log("check inputs ready")

  # Benchmark programs: forward and forward+backward per impl and shape.
  impls = ((["reference"] if opts.time_reference else []) + ["associative", "pallas", "pallas:v4"]
           + (["jla"] if use_jla else []))
  if opts.impls:
    impls = [i for i in opts.impls.split(",") if i != "jla" or use_jla]
  oracles = {}
  if not opts.check_only:
    for shape in shapes:
      b, L, d, n = shape
      inp = make_inputs(2, b, L, d, n, 1, jnp.bfloat16)
      args = tuple(inp[k] for k in DIFF_ARGS)
      present = tuple(a is not None for a in args)
      ct = _normal(9, (b, L, d), jnp.bfloat16)
      data[shape] = (args, ct, present)
      results.setdefault("pallas_default_configs", {})[str(shape)] = str(
          PSS.default_config(b, L, d, n))
      for impl in impls:
        f = op_fn(impl)
        jobs[f"{shape}/{impl}/fwd"] = (f, args)
        jobs[f"{shape}/{impl}/fwdbwd"] = (fwd_bwd_fn(f, present), (args, ct))
      if not opts.no_shape_checks:
        pieces, oracles[shape] = oracle_for(shape)
        f = op_fn("reference") if pieces == 1 else reference_pieces_fn(pieces)
        jobs[f"{shape}/oracle/fwdbwd"] = (fwd_bwd_fn(f, present), (args, ct))
    if opts.sweep:
      for shape, cfg in SWEEP:
        if shape in data and re.search(opts.sweep_match, json.dumps(cfg, sort_keys=True)):
          args, ct, present = data[shape]
          f = op_fn("pallas", config=PSS.Config(**cfg))
          if not all(k.startswith("bwd_") for k in cfg):   # else the forward is the default's
            jobs[f"{shape}/sweep:{json.dumps(cfg, sort_keys=True)}/fwd"] = (f, args)
          jobs[f"{shape}/sweep:{json.dumps(cfg, sort_keys=True)}/fwdbwd"] = (
              fwd_bwd_fn(f, present), (args, ct))
  log(f"benchmark inputs ready; {len(jobs)} programs to build")
  exes = compile_all(jobs, opts.workers)
  results["compile_s"] = time.time() - t_start
  # The budget counts from here: building the programs took 113 s in all on one H100 machine and
  # 170 s for jla's alone on an H200 one (2026-12-05, whose every timing was then skipped).
  t_budget = time.time()
  results["program_bytes"] = {k: exe_bytes(v) for k, v in exes.items()
                              if not isinstance(v, Exception)}
  save()

  # 1. The small checks (seconds each).
  for name, *_ in CHECKS:
    args, ct, present, tol = data[name]
    results["checks"].append(check_case(name, exes.get(f"{name}/pallas"), exes.get(f"{name}/reference"),
                                        args, ct, present, tol, opts.check_cap_s))
    save()

  # 2. Timings of every shape and impl, then the sweep: before the long checks, so that a check
  #    that fails or stalls cannot cost the table.
  if not opts.check_only:
    for shape in shapes:
      b, L, d, n = shape
      args, ct, present = data[shape]
      for impl in impls:
        for mode in ("fwd", "fwdbwd"):
          row = dict(shape=list(shape), impl=impl, mode=mode)
          exe = exes.get(f"{shape}/{impl}/{mode}")
          if time.time() - t_budget > opts.budget_s:
            row["error"] = "skipped: time budget"
          elif isinstance(exe, Exception) or exe is None:
            row["error"] = f"{type(exe).__name__}: {str(exe)[:300]}"
          elif too_big(exe):
            row["error"] = too_big(exe)
          else:
            reps = {"reference": 3, "associative": 10}.get(impl, 20)
            try:
              call_args = args if mode == "fwd" else (args, ct)
              ms = time_exe(exe, call_args, reps)
              moved = must_move_bytes(b, L, d, n, 1, 2, mode == "fwdbwd")
              row.update(ms=ms, must_move_bytes=moved, achieved_bytes_per_s=moved / (ms * 1e-3),
                         hbm_fraction=moved / (ms * 1e-3) / HBM_BYTES_PER_S)
              if impl != "reference":
                row["pipelined_ms"] = timing.pipelined(exe, call_args, reps)
            except Exception as e:  # noqa: BLE001
              row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
          log(json.dumps(row))
          results["bench"].append(row)
          save()
  if opts.sweep and not opts.check_only:
    for name, exe in exes.items():
      if "/sweep:" not in name:
        continue
      shape_s, cfg_s, mode = name.split("/")
      shape = tuple(json.loads("[" + shape_s.strip("()") + "]"))
      args, ct, present = data[shape]
      row = dict(shape=list(shape), config=json.loads(cfg_s[len("sweep:"):]), mode=mode)
      if time.time() - t_budget > opts.budget_s + 30:
        row["error"] = "skipped: time budget"
      elif isinstance(exe, Exception):
        row["error"] = f"{type(exe).__name__}: {str(exe)[:300]}"
      else:
        try:
          call_args = args if mode == "fwd" else (args, ct)
          row["ms"] = time_exe(exe, call_args, 20)
          row["pipelined_ms"] = timing.pipelined(exe, call_args, 20)
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      log(json.dumps(row))
      results["sweep"].append(row)
      save()

  # 3. The benchmark shapes' checks (bf16, every gradient), smallest oracle first, each capped.
  if not opts.check_only and not opts.no_shape_checks:
    for shape in sorted(shapes, key=lambda s: reference_bytes(*s) / oracle_for(s)[0]):
      args, ct, present = data[shape]
      if time.time() - t_budget > opts.budget_s + 90:
        results["checks"].append(dict(case=f"{shape}:check", tol=1e-2, oracle=oracles[shape], ok=False,
                                      error="skipped: time budget"))
        save()
        continue
      results["checks"].append(check_case(
          f"{shape}:check", exes.get(f"{shape}/pallas/fwdbwd"), exes.get(f"{shape}/oracle/fwdbwd"),
          args, ct, present, 1e-2, opts.check_cap_s, oracle=oracles[shape]))
      save()
  results["wall_s"] = time.time() - t_start
  save()
  _report(results, opts.out)


# Tiling variants timed with --sweep (shape -> Config fields). The knobs measured before and lost
# (v3, v5, v7, prefetch, bwd_prefetch, pack_bc) are gone from the kernels: tag kernel-lab-history.
SWEEP = [
    # The other kernel family at d_state 16 (the default there is v6).
    ((8, 2048, 1536, 16), dict(kernels="v4")),
    ((8, 2048, 5120, 16), dict(kernels="v4")),
    # v6 checkpoints every 4 tokens instead of 8 (fewer registers, twice the checkpoint traffic).
    ((8, 2048, 5120, 16), dict(chunk=4)),
    ((8, 2048, 1536, 16), dict(chunk=4)),
]


def _report(results: dict[str, Any], out: str, echo: bool = True) -> None:
  meta = results["meta"]
  lines = ["# Selective scan: forward and forward+backward (bf16, D, z, delta_bias, softplus)", "",
           f"device: {meta['device']}; date: {meta['date']}; commit: {meta['commit']}; "
           f"jax {meta['jax']}; HBM ceiling {HBM_BYTES_PER_S / 1e12:.2f} TB/s", ""]
  if meta.get("jla"):
    lines += [f"jax-linear-attention not run: {meta['jla']}", ""]
  for shape, cfg in results.get("pallas_default_configs", {}).items():
    lines.append(f"- pallas default at {shape}: `{cfg}`")
  lines.append("")
  lines += ["## Correctness against the reference (relative Frobenius error)", "",
            "| case | oracle | ok | worst | errors |", "| --- | --- | --- | --- | --- |"]
  for c in results["checks"]:
    errs = c.get("errors", {})
    worst = max(errs.values()) if errs else float("nan")
    detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) or c.get("error", "")
    lines.append(f"| {c['case']} | {c.get('oracle', 'reference')} | {c['ok']} | "
                 f"{worst:.1e} (tol {c['tol']:.0e}) | {detail} |")
  bench = results["bench"]
  if bench:
    lines += ["", "## Timings (median ms; achieved = must-move bytes / time)", "",
              "Synchronised: every call waited for; pipelined: calls dispatched back to back and "
              "waited for once (ssm_lab/timing.py). Ratios are of the synchronised times, with "
              "the pipelined ones in brackets.", "",
              "| shape (b, L, d_inner, d_state) | impl | fwd ms | fwd+bwd ms | fwd+bwd pipelined ms "
              f"| fwd+bwd achieved TB/s (% of {results['meta']['hbm_ceiling_bytes_per_s'] / 1e12:.2f})"
              " | fwd+bwd vs associative | fwd+bwd vs jla |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    by = {(tuple(r["shape"]), r["impl"], r["mode"]): r for r in bench}
    for shape in dict.fromkeys(tuple(r["shape"]) for r in bench):
      for impl in dict.fromkeys(r["impl"] for r in bench):
        f, fb = by.get((shape, impl, "fwd"), {}), by.get((shape, impl, "fwdbwd"), {})
        if not f and not fb:
          continue
        def ms(r):
          return f"{r['ms']:.3f}" if "ms" in r else ("n/a: " + r.get("error", "")[:60])
        ach = (f"{fb['achieved_bytes_per_s'] / 1e12:.2f} ({100 * fb['hbm_fraction']:.0f}%)"
               if "ms" in fb else "")
        assoc = by.get((shape, "associative", "fwdbwd"), {})
        jla = by.get((shape, "jla", "fwdbwd"), {})
        def piped(a, b):
          return (f" ({a['pipelined_ms'] / b['pipelined_ms']:.2f}x)"
                  if "pipelined_ms" in a and "pipelined_ms" in b else "")
        vs_a = (f"{assoc['ms'] / fb['ms']:.1f}x faster{piped(assoc, fb)}"
                if "ms" in fb and "ms" in assoc else "")
        vs_j = (f"{fb['ms'] / jla['ms']:.2f}x its time{piped(fb, jla)}"
                if "ms" in fb and "ms" in jla else "")
        pipe = f"{fb['pipelined_ms']:.3f}" if "pipelined_ms" in fb else ""
        lines.append(f"| {shape} | {impl} | {ms(f)} | {ms(fb)} | {pipe} | {ach} | {vs_a} | {vs_j} |")
  if results.get("sweep"):
    lines += ["", "## Pallas tiling sweep (median ms)", "",
              "| shape | config | mode | ms | pipelined ms |", "| --- | --- | --- | --- | --- |"]
    for r in results["sweep"]:
      head = f"| {tuple(r['shape'])} | {r['config']} | {r['mode']} | "
      if "ms" in r:
        pipe = f"{r['pipelined_ms']:.3f}" if "pipelined_ms" in r else ""
        lines.append(head + f"{r['ms']:.3f} | {pipe} |")
      else:
        lines.append(head + f"{r.get('error', '')[:80]} | |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "selective_scan.md"), "w") as fh:
    fh.write(text)
  if echo:
    print(text, flush=True)


if __name__ == "__main__":
  main()
