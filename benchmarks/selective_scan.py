"""Selective scan on the GPU: correctness at realistic shapes, then forward / forward+backward timings.

Run on the device machine (see benchmarks/NOTES_selective_scan.md for the numbers and their meaning):

  python benchmarks/selective_scan.py --out DIR              # checks, benchmark table, results files
  python benchmarks/selective_scan.py --out DIR --check-only # correctness only
  python benchmarks/selective_scan.py --out DIR --quick      # one benchmark shape, fewer repetitions
  python benchmarks/selective_scan.py --out DIR --sweep      # also time Pallas tiling variants
                                                             # (--variants is the same flag)

Impls: "reference" (lax.scan; timed only with --time-reference, always the correctness oracle),
"associative", "pallas" (ssm_lab.ops.pallas.selective_scan, default config: the v4 time-parallel
kernels), "pallas:v3" (the v3 token-by-token kernels, `Config(variant="v3")`, timed side by side) and,
when importable, jax-linear-attention 0.1.0's Mosaic GPU kernel ("jla"). Every call is the typical Mamba
block call: D skip, z gate, delta_bias and softplus, bf16 activations, n_groups 1. Timings are medians
of repeated runs after warm-up (jax.block_until_ready around each), on random inputs. Achieved HBM
bandwidth is counted against the bytes that must move: every input read once and every output written
once (forward: u, delta, z, B, C in, y out; forward+backward adds dy, u, delta, z, B, C in and du,
ddelta, dz, dB, dC out), over the measured 2.46 TB/s ceiling.

Compilation (Triton's passes take 10-20 s for these kernels) runs ahead of time in a thread pool.
The script writes selective_scan.json and selective_scan.md under --out and prints the table last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
import types
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HBM_BYTES_PER_S = 2.46e12        # measured H100 ceiling (device-to-device copy), see the brief
SHAPES = [(8, 2048, 1536, 16), (2, 8192, 1536, 16), (1, 65536, 2048, 16), (8, 2048, 5120, 16)]


def _load_ops():
  """Imports the op and the Pallas module; falls back to importing only the files this script needs
  when another module of ssm_lab.ops fails to import (the working tree is shared)."""
  try:
    from ssm_lab.ops import selective_scan as ss_fn  # noqa: F401
    ss = importlib.import_module("ssm_lab.ops.selective_scan")
    pss = importlib.import_module("ssm_lab.ops.pallas.selective_scan")
    return ss, pss, None
  except Exception as e:  # noqa: BLE001  (any import failure of a sibling module)
    why = f"{type(e).__name__}: {e}"
  for name in [m for m in sys.modules if m.startswith("ssm_lab.ops")]:
    del sys.modules[name]
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ssm_lab")
  import ssm_lab  # noqa: F401
  ops = types.ModuleType("ssm_lab.ops")
  ops.__path__ = [os.path.join(root, "ops")]
  sys.modules["ssm_lab.ops"] = ops
  pal = types.ModuleType("ssm_lab.ops.pallas")
  pal.__path__ = [os.path.join(root, "ops", "pallas")]
  pal.interpret_mode = lambda: jax.default_backend() != "gpu"
  sys.modules["ssm_lab.ops.pallas"] = pal
  ss = importlib.import_module("ssm_lab.ops.selective_scan")
  pss = importlib.import_module("ssm_lab.ops.pallas.selective_scan")
  return ss, pss, why


SS, PSS, IMPORT_FALLBACK = _load_ops()


def _jla():
  try:
    import jla.ops  # noqa: F401
    return jla.ops, None
  except Exception as e:  # noqa: BLE001
    return None, f"{type(e).__name__}: {e}"


JLA, JLA_ERROR = _jla()


# ---------------------------------------------------------------------------------------------------
# Inputs and the functions under test.


def make_inputs(seed: int, b: int, L: int, d: int, n: int, g: int = 1, dtype=jnp.bfloat16, *,
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
    if impl == "pallas:v3" and config is None:
      return PSS.selective_scan_pallas(u, delta, A, B, C, config=PSS.Config(variant="v3"), **kw)
    if impl.startswith("pallas") and config is not None:
      return PSS.selective_scan_pallas(u, delta, A, B, C, config=config, **kw)
    return SS.selective_scan(u, delta, A, B, C, impl=impl.split(":")[0], **kw)

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


# ---------------------------------------------------------------------------------------------------
# Compilation and timing.


def compile_all(jobs: dict[str, tuple[Callable[..., Any], tuple]], workers: int) -> dict[str, Any]:
  """Lowers each job here, compiles them in a thread pool (XLA and Triton release the GIL)."""
  lowered, compiled = {}, {}
  for name, (fn, args) in jobs.items():
    try:
      lowered[name] = jax.jit(fn).lower(*args)
    except Exception as e:  # noqa: BLE001  (record and go on: one failing case must not stop the rest)
      compiled[name] = e
      print(f"  lower {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
  t0 = time.time()

  def comp(item):
    name, low = item
    t = time.time()
    try:
      return name, low.compile(), time.time() - t
    except Exception as e:  # noqa: BLE001
      return name, e, time.time() - t

  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for name, exe, dt in pool.map(comp, lowered.items()):
      compiled[name] = exe
      status = "ok" if not isinstance(exe, Exception) else f"FAILED {type(exe).__name__}: {str(exe)[:300]}"
      print(f"  compile {name}: {dt:.1f}s {status}", flush=True)
  print(f"compiled {len(lowered)} programs in {time.time() - t0:.1f}s", flush=True)
  return compiled


def time_exe(exe, args, reps: int, warmup: int = 2) -> float:
  """Median wall time in ms of exe(*args) (synchronised with block_until_ready)."""
  for _ in range(warmup if reps > 3 else 1):
    jax.block_until_ready(exe(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(exe(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts) * 1e3)


def rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def must_move_bytes(b, L, d, n, g, itemsize, backward: bool) -> int:
  tok, grp = b * L * d * itemsize, b * L * g * n * itemsize
  fwd = 4 * tok + 2 * grp                   # u, delta, z, y ; B, C
  return fwd + (7 * tok + 4 * grp if backward else 0)   # dy, u, delta, z -> du, ddelta, dz ; B, C -> dB, dC


# ---------------------------------------------------------------------------------------------------


def check_case(name, exes, args_ref, ct, present, tol) -> dict[str, Any]:
  """Compares the pallas executable's outputs and gradients with the reference executable's."""
  res: dict[str, Any] = dict(case=name, tol=tol)
  try:
    out_p, grads_p = exes[f"{name}/pallas"](args_ref, ct)
    out_r, grads_r = exes[f"{name}/reference"](args_ref, ct)
    outs_p = out_p if isinstance(out_p, tuple) else (out_p,)
    outs_r = out_r if isinstance(out_r, tuple) else (out_r,)
    errs = {}
    for label, a, b in zip(("y", "final_state"), outs_p, outs_r, strict=False):
      errs[label] = rel_err(a, b)
    names = [k for k, p in zip(DIFF_ARGS, present, strict=True) if p]
    for k, a, b in zip(names, grads_p, grads_r, strict=True):
      errs["d" + k] = rel_err(a, b)
    res["errors"] = errs
    res["ok"] = all(np.isfinite(v) and v <= tol for v in errs.values())
  except Exception as e:  # noqa: BLE001
    res["ok"] = False
    res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    traceback.print_exc()
  print(f"check {name}: {'OK' if res['ok'] else 'FAIL'} "
        + json.dumps({k: f'{v:.2e}' for k, v in res.get('errors', {}).items()}), flush=True)
  return res


CHECKS = [
    # name, (b, L, d, n, g), dtype, init, z, softplus, tol
    ("f32_init_final", (2, 2048, 1536, 16, 1), jnp.float32, True, True, True, 1e-4),
    ("bf16_ragged_groups", (3, 1000, 1000, 12, 4), jnp.bfloat16, True, False, False, 1e-2),
    ("f32_dstate64", (2, 1024, 256, 64, 2), jnp.float32, True, True, True, 1e-4),
    ("bf16_long_segments", (1, 16384, 512, 16, 1), jnp.bfloat16, True, True, True, 1e-2),
]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--check-only", action="store_true")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--sweep", "--variants", dest="sweep", action="store_true")
  ap.add_argument("--time-reference", action="store_true", help="also time the lax.scan oracle")
  ap.add_argument("--no-jla", action="store_true")
  ap.add_argument("--workers", type=int, default=12)
  ap.add_argument("--budget-s", type=float, default=400.0, help="stop timing new cases after this")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (to try the script on a CPU)")
  opts = ap.parse_args()
  global SHAPES, CHECKS, SWEEP
  if opts.smoke:
    SHAPES = [(2, 64, 64, 4)]
    CHECKS = [(n, (s[0], min(s[1], 50), min(s[2], 40), min(s[3], 5), 1 if s[4] == 1 else 2), *rest)
              for n, s, *rest in CHECKS[:2]]
    SWEEP = [((2, 64, 64, 4), dict(segments=2, chunk=8)),
             ((2, 64, 64, 4), dict(variant="v3", segments=2, chunk=2, unroll=4))]
  os.makedirs(opts.out, exist_ok=True)
  t_start = time.time()
  dev = jax.devices()[0]
  try:
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
  except OSError:
    commit = "unknown"
  meta = dict(device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
              date=datetime.date.today().isoformat(), commit=commit, import_fallback=IMPORT_FALLBACK,
              jla=None if JLA is not None else JLA_ERROR, hbm_ceiling_bytes_per_s=HBM_BYTES_PER_S)
  print(json.dumps(meta), flush=True)
  results: dict[str, Any] = dict(meta=meta, checks=[], bench=[], sweep=[])

  def save():
    with open(os.path.join(opts.out, "selective_scan.json"), "w") as fh:
      json.dump(results, fh, indent=1)

  shapes = SHAPES[:1] if opts.quick else SHAPES
  use_jla = JLA is not None and not opts.no_jla
  jobs: dict[str, tuple[Callable[..., Any], tuple]] = {}
  data: dict[str, Any] = {}

  # Correctness at realistic shapes: outputs (y, final state) and all gradients vs the reference.
  for name, (b, L, d, n, g), dtype, init, z, sp, tol in CHECKS:
    inp = make_inputs(1, b, L, d, n, g, dtype, init=init, z=z, positive_delta=not sp)
    args = tuple(inp[k] for k in DIFF_ARGS)
    present = tuple(a is not None for a in args)
    ct = (jax.random.normal(jax.random.PRNGKey(7), (b, L, d)).astype(dtype),
          jax.random.normal(jax.random.PRNGKey(8), (b, d, n)))
    for impl in ("reference", "pallas"):
      jobs[f"{name}/{impl}"] = (fwd_bwd_fn(op_fn(impl, sp, final_state=True), present), (args, ct))
    data[name] = (args, ct, present, tol)

  # Benchmark programs: forward and forward+backward per impl and shape.
  impls = ((["reference"] if opts.time_reference else []) + ["associative", "pallas", "pallas:v3"]
           + (["jla"] if use_jla else []))
  if not opts.check_only:
    for shape in shapes:
      b, L, d, n = shape
      inp = make_inputs(2, b, L, d, n, 1, jnp.bfloat16)
      args = tuple(inp[k] for k in DIFF_ARGS)
      present = tuple(a is not None for a in args)
      ct = jax.random.normal(jax.random.PRNGKey(9), (b, L, d)).astype(jnp.bfloat16)
      data[shape] = (args, ct, present)
      results.setdefault("pallas_default_configs", {})[str(shape)] = str(
          PSS.default_config(b, L, d, n))
      # The reference's fwd+bwd is always compiled: it is the oracle of the shape's check.
      jobs[f"{shape}/reference/fwdbwd"] = (fwd_bwd_fn(op_fn("reference"), present), (args, ct))
      for impl in impls:
        f = op_fn(impl)
        jobs[f"{shape}/{impl}/fwd"] = (f, args)
        jobs[f"{shape}/{impl}/fwdbwd"] = (fwd_bwd_fn(f, present), (args, ct))
    if opts.sweep:
      for shape, cfg in SWEEP:
        if shape in data:
          args, ct, present = data[shape]
          f = op_fn("pallas", config=PSS.Config(**cfg))
          jobs[f"{shape}/sweep:{json.dumps(cfg, sort_keys=True)}/fwd"] = (f, args)
          jobs[f"{shape}/sweep:{json.dumps(cfg, sort_keys=True)}/fwdbwd"] = (
              fwd_bwd_fn(f, present), (args, ct))
  exes = compile_all(jobs, opts.workers)
  results["compile_s"] = time.time() - t_start
  save()

  for name, *_ in CHECKS:
    args, ct, present, tol = data[name]
    results["checks"].append(check_case(name, exes, args, ct, present, tol))
    save()
  # The benchmark shapes: pallas against the reference, values and every gradient (bf16).
  if not opts.check_only:
    for shape in shapes:
      args, ct, present = data[shape]
      key = f"{shape}"
      if any(exes.get(f"{key}/{i}/fwdbwd") is None or isinstance(exes[f"{key}/{i}/fwdbwd"], Exception)
             for i in ("pallas", "reference")):
        continue
      exes[f"{key}:check/pallas"] = exes[f"{key}/pallas/fwdbwd"]
      exes[f"{key}:check/reference"] = exes[f"{key}/reference/fwdbwd"]
      results["checks"].append(check_case(f"{key}:check", exes, args, ct, present, 1e-2))
      save()

  if opts.check_only:
    _report(results, opts.out)
    return

  for shape in shapes:
    b, L, d, n = shape
    args, ct, present = data[shape]
    for impl in impls:
      for mode in ("fwd", "fwdbwd"):
        row = dict(shape=list(shape), impl=impl, mode=mode)
        exe = exes.get(f"{shape}/{impl}/{mode}")
        if time.time() - t_start > opts.budget_s:
          row["error"] = "skipped: time budget"
        elif isinstance(exe, Exception) or exe is None:
          row["error"] = f"{type(exe).__name__}: {str(exe)[:300]}"
        else:
          reps = {"reference": 3, "associative": 10}.get(impl, 20)
          try:
            ms = time_exe(exe, args if mode == "fwd" else (args, ct), reps)
            moved = must_move_bytes(b, L, d, n, 1, 2, mode == "fwdbwd")
            row.update(ms=ms, must_move_bytes=moved, achieved_bytes_per_s=moved / (ms * 1e-3),
                       hbm_fraction=moved / (ms * 1e-3) / HBM_BYTES_PER_S)
          except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        results["bench"].append(row)
        save()
  if opts.sweep:
    for name, exe in exes.items():
      if "/sweep:" not in name or time.time() - t_start > opts.budget_s + 30:
        continue
      shape_s, cfg_s, mode = name.split("/")
      shape = tuple(json.loads("[" + shape_s.strip("()") + "]"))
      args, ct, present = data[shape]
      row = dict(shape=list(shape), config=json.loads(cfg_s[len("sweep:"):]), mode=mode)
      if isinstance(exe, Exception):
        row["error"] = f"{type(exe).__name__}: {str(exe)[:300]}"
      else:
        try:
          row["ms"] = time_exe(exe, args if mode == "fwd" else (args, ct), 20)
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(row), flush=True)
      results["sweep"].append(row)
      save()
  results["wall_s"] = time.time() - t_start
  save()
  _report(results, opts.out)


# Tiling variants timed with --sweep (shape -> Config fields; the default v4 config is chunk 16,
# block_d 32, 8 warps, state_block 16 forward / 8 backward, segments for >= 512 programs).
SWEEP = [
    ((8, 2048, 1536, 16), dict(chunk=8)),
    ((8, 2048, 1536, 16), dict(chunk=32)),
    ((8, 2048, 1536, 16), dict(num_warps=4)),
    ((8, 2048, 1536, 16), dict(block_d=16)),
    ((8, 2048, 1536, 16), dict(state_block=8)),
    ((8, 2048, 1536, 16), dict(bwd_state_block=16)),
    ((8, 2048, 1536, 16), dict(bwd_state_block=4)),
    ((8, 2048, 1536, 16), dict(segments=1)),
    ((8, 2048, 1536, 16), dict(segments=4)),
    ((2, 8192, 1536, 16), dict(segments=16)),
    ((1, 65536, 2048, 16), dict(segments=32)),
    ((8, 2048, 5120, 16), dict(segments=2)),
]


def _report(results: dict[str, Any], out: str) -> None:
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
            "| case | ok | worst | errors |", "| --- | --- | --- | --- |"]
  for c in results["checks"]:
    errs = c.get("errors", {})
    worst = max(errs.values()) if errs else float("nan")
    detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) or c.get("error", "")
    lines.append(f"| {c['case']} | {c['ok']} | {worst:.1e} (tol {c['tol']:.0e}) | {detail} |")
  bench = results["bench"]
  if bench:
    lines += ["", "## Timings (median ms; achieved = must-move bytes / time)", "",
              "| shape (b, L, d_inner, d_state) | impl | fwd ms | fwd+bwd ms | fwd+bwd achieved TB/s "
              "(% of 2.46) | fwd+bwd vs associative | fwd+bwd vs jla |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
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
        vs_a = f"{assoc['ms'] / fb['ms']:.1f}x faster" if "ms" in fb and "ms" in assoc else ""
        vs_j = f"{fb['ms'] / jla['ms']:.2f}x its time" if "ms" in fb and "ms" in jla else ""
        lines.append(f"| {shape} | {impl} | {ms(f)} | {ms(fb)} | {ach} | {vs_a} | {vs_j} |")
  if results.get("sweep"):
    lines += ["", "## Pallas tiling sweep (median ms)", "", "| shape | config | mode | ms |",
              "| --- | --- | --- | --- |"]
    for r in results["sweep"]:
      lines.append(f"| {tuple(r['shape'])} | {r['config']} | {r['mode']} | "
                   f"{r['ms']:.3f} |" if "ms" in r else f"| {tuple(r['shape'])} | {r['config']} | "
                   f"{r['mode']} | {r.get('error', '')[:80]} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "selective_scan.md"), "w") as fh:
    fh.write(text)
  print(text, flush=True)


if __name__ == "__main__":
  main()
