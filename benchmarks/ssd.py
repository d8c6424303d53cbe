"""SSD (Mamba-2) on the GPU: correctness at realistic shapes, then forward and forward+backward times.

One script for one device call:
  1. correctness: pallas (and chunked) against the float32 reference at a medium shape (values, final
     state and every gradient), and pallas against the float32 chunked op at the benchmark shapes;
  2. timing (ssm_lab/timing.py): each row both synchronised per call (median of repeated runs
     after warm-up) and pipelined (runs dispatched back to back, one wait), bf16, (batch, length) in
     (8, 2048), (2, 8192),
     (1, 65536) with 24 heads, head_dim 64, d_state 128, one B/C group, for our "chunked" XLA op, our
     "pallas" kernels and, in the same run, jax-linear-attention 0.1.0's Mosaic GPU `simple_gla`
     (q=C, k=B, v=dt*x, g=dt*A, scale=1), if it is importable, plus layout and tiling rows of the
     same kernels (CANDIDATES; --candidates REGEX picks some) at every shape; --variants adds tuning
     rows at the first shape, timed right after it; --rounds R times every row once a round, R rounds.
     The algorithm alternatives once timed here (sequential backward, chunk-parallel forward, split
     backward kernel, atomic group sum, float32 dS_end) are deleted; benchmarks/NOTES_ssd.md.

Every program takes its arrays as jit arguments (no large constants for XLA to fold) and all are
compiled up front in a thread pool; --budget_s bounds the run (no compile starts after 0.6 of it, no
row after it; skipped rows are recorded). Each pallas-family fwd+bwd program is also checked against
the float32 chunked op at its shape. Writes ssd.json and ssd.md under --out after every row (a run
cut short keeps what it finished) and prints the table last.

  python -m benchmarks.ssd --out /tmp/ssd            # on a GPU
  python -m benchmarks.ssd --out /tmp/ssd --smoke    # tiny shapes, runs anywhere (interpret mode)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import json
import pathlib
import re
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

HBM_TBS = 2.46      # ceilings of the chip that runs: set in main() from benchmarks/ceilings.py
TOL = {"float32": 1e-4, "bfloat16": 1e-2}   # relative Frobenius error vs the float32 oracle
MATMUL_TFS = 736.0


import ssm_lab.ops.pallas.ssd as PAL  # noqa: E402
from ssm_lab.ops import ssd  # noqa: E402
from ssm_lab.provenance import git_commit  # noqa: E402

from benchmarks import ceilings  # noqa: E402
from ssm_lab import timing  # noqa: E402

ssd_pallas = PAL.ssd_pallas


def _import_jla():
  try:
    from jla.ops import linear_attention
    return linear_attention, None
  except Exception as e:  # noqa: BLE001  (report why the comparison is missing, keep the rest)
    return None, f"{type(e).__name__}: {e}"


@jax.jit
def _rel_dev(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30)


@functools.partial(jax.jit, static_argnums=tuple(range(1, 8)))
def make_inputs(key, batch, length, heads, head_dim, d_state, groups=1, dtype=jnp.bfloat16):
  """Random inputs in Mamba-2's ranges: dt log-uniform in [1e-3, 1e-1], A = -uniform[1, 16].
  Generated on the device by one jitted program (the timed programs take them as arguments)."""
  ks = jax.random.split(key, 7)
  x = jax.random.normal(ks[0], (batch, length, heads, head_dim), jnp.float32).astype(dtype)
  dt = jnp.exp(jax.random.uniform(ks[1], (batch, length, heads), minval=np.log(1e-3),
                                  maxval=np.log(1e-1)))
  A = -jax.random.uniform(ks[2], (heads,), minval=1.0, maxval=16.0)
  B = jax.random.normal(ks[3], (batch, length, groups, d_state), jnp.float32).astype(dtype)
  C = jax.random.normal(ks[4], (batch, length, groups, d_state), jnp.float32).astype(dtype)
  D = jax.random.normal(ks[5], (heads,), jnp.float32)
  dy = jax.random.normal(ks[6], x.shape, jnp.float32).astype(dtype)
  return dict(x=x, dt=dt, A=A, B=B, C=C, D=D), dy


def rel(a, b) -> float:
  """Relative Frobenius error |a - b| / |b|, computed on the device (float32 sums)."""
  return float(_rel_dev(a, b))


def _structs(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


# ------------------------------------------------------------------------------------ the functions
# Every timed or checked function takes all arrays as arguments (jit parameters): nothing large is
# closed over, so XLA has no constants to fold (the previous version closed over dy and spent most
# of its device time constant-folding [8, 32, 24, 64, 64] transposes of it).

def ours(impl, **kw):
  # No D in the timed calls: jax-linear-attention's simple_gla has no skip term.
  def f(x, dt, A, B, C, D):
    del D
    if impl == "pallas":
      return ssd_pallas(x, dt, A, B, C, return_final_state=True, **kw)
    return ssd(x, dt, A, B, C, return_final_state=True, impl=impl, **kw)
  return f


def jla_fn(linear_attention):
  def f(x, dt, A, B, C, D):
    v = (dt[..., None] * x.astype(jnp.float32)).astype(x.dtype)
    g = dt * A
    del D
    return linear_attention("simple_gla", q=C, k=B, v=v, g=g, scale=1.0, output_final_state=True,
                            impl="mosaic_gpu")
  return f


def fwd_and_fwdbwd(f):
  """(fwd(a) -> y, fb(a, dy) -> (y, grads of <y, dy> w.r.t. every input in a))."""
  def fwd(a):
    return f(**a)[0]

  def fb(a, dy):
    y, vjp = jax.vjp(lambda a: f(**a)[0], a)
    return y, vjp(dy.astype(y.dtype))[0]
  return fwd, fb


def compile_all(jobs, workers, deadline):
  """jobs: {name: (fn, arg structs)} in priority order -> {name: compiled or Exception or None}.

  Each worker lowers (tracing holds the GIL) then compiles (XLA and Triton release it), so compiles
  start at once and overlap the tracing of later jobs. A job that would start after `deadline`
  (time.time()) is skipped (None): the timing phase reports it as skipped instead of the whole run
  hitting its time limit. A failure is recorded as the exception: one bad case does not stop the rest."""
  out = {}
  t0 = time.time()

  def comp(item):
    name, (fn, structs) = item
    if time.time() > deadline:
      return name, None, 0.0
    t = time.time()
    try:
      return name, jax.jit(fn).lower(*structs).compile(), time.time() - t
    except Exception as e:  # noqa: BLE001
      return name, e, time.time() - t

  def record(name, exe, secs):
    out[name] = exe
    status = ("skipped: compile deadline" if exe is None else "ok" if not isinstance(exe, Exception)
              else f"FAILED {type(exe).__name__}: {str(exe)[:300]}")
    print(f"  compile {name}: {secs:.1f}s {status} (t={time.time() - t0:.0f}s)", flush=True)

  # jax-linear-attention's programs compile one at a time first: its mosaic_gpu backward at
  # (8, 2048) refused the call when compiled among parallel compiles (H200, 2026-12-04) and
  # compiled alone.
  serial = [item for item in jobs.items() if "jla" in item[0]]
  for item in serial:
    record(*comp(item))
  rest = [item for item in jobs.items() if "jla" not in item[0]]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for name, exe, secs in pool.map(comp, rest):
      record(name, exe, secs)
  print(f"compiled {len(jobs)} programs in {time.time() - t0:.1f}s", flush=True)
  return out


def floors(batch, length, heads, head_dim, d_state, groups, chunk=64):
  """Fewest bytes (each input read once, each output written once; bf16, dt f32) and the chunked
  algorithm's matmul FLOPs, forward and forward+backward."""
  tok = batch * length
  xb = tok * heads * head_dim * 2
  bc = 2 * tok * groups * d_state * 2
  dtb = tok * heads * 4
  fwd_bytes = xb + bc + dtb + xb                          # x, B, C, dt in; y out
  bwd_bytes = (xb + bc + dtb + xb) + (xb + bc + dtb)        # x, B, C, dt, dy in; dx, dB, dC, ddt out
  per_tok = 2 * chunk * d_state * heads + 2 * chunk * head_dim * heads + 4 * head_dim * d_state * heads
  fwd_flops = tok * per_tok
  # backward: recompute C B^T and dy u^T (2 Q N + 2 Q P), then dC, du, dB (three Q x Q products and
  # three state products) and the dS update: about 2.5x the forward.
  return fwd_bytes, fwd_bytes + bwd_bytes, fwd_flops, 3.5 * fwd_flops


# Layout and tiling rows (ssd_pallas parameters), timed and checked at EVERY shape next to the
# default: (row name, parameters, time the forward too).
def _segment_cut(shape):
  """The default before choose_layout (2026-12-05): choose_segments' cut, no head_dim split."""
  b, l, h = shape[:3]
  return {"segments": PAL.choose_segments(b, h, -(-l // PAL.DEFAULT_CHUNK))}


# A row's parameters: a dict, or a function of the shape (b, L, h, P, N) giving one.
CANDIDATES = (
    ("pallas segment cut (previous default)", _segment_cut, True),
    # At (8, 2048) the unsplit dS pass has 768 programs (1.45 waves of 4 an SM); 0.957 / 0.993 /
    # 0.985 of the default on the H100 (results/ssd_h100_choose_layout.md).
    ("pallas ds_block=32", {"ds_block": 32}, False),
)
def _knobs(kw, shape):
  return kw(shape) if callable(kw) else kw


# Tuning rows for --variants (first shape only, timed right after its main rows): knob, value.
# Defaults: segments from choose_segments (2 at (8, 2048)), ds_block 16, num_warps_chunk 4,
# num_warps_ds 4, num_stages_ds 3.
# chunk_size 32: [Q, Q] tiles a quarter the size, so fewer live registers in the chunk kernel (it is
# at 255 with spills at Q = 64), twice the programs and state round trips.
VARIANTS = (("segments", 1), ("segments", 4), ("ds_block", 32), ("ds_block", 64),
            ("num_warps_chunk", 2), ("num_warps_chunk", 16), ("num_warps_ds", 2),
            ("num_warps_ds", 8), ("num_stages_ds", 2), ("chunk_size", 32), ("num_warps_fwd", 8),
            ("num_stages_fwd", 2))
# Cases of the correctness check against the float32 reference (name, impl, parameters): every
# dtype and group count; the candidates with 2 groups.
CHECK_CASES = (("chunked", "chunked", {}), ("pallas", "pallas", {}),
               ("pallas segments=4", "pallas", {"segments": 4}))
CHECK_SHAPE = (2, 1024, 8, 64, 128)
CHECK_CANDIDATES = tuple((name, "pallas", _knobs(kw, CHECK_SHAPE)) for name, kw, _ in CANDIDATES)


def _check_cases(dname, groups):
  del dname
  return CHECK_CASES + (CHECK_CANDIDATES if groups == 2 else ())


# ------------------------------------------------------------------------------------------- checks

def _check_fn(impl, kw):
  """(a, dy, ds) -> (y, final state, grads of <y, dy> + <s, ds> w.r.t. a, initial state included)."""
  def f(a):
    a = dict(a)
    s_init = a.pop("initial_state")
    if impl == "pallas":
      return ssd_pallas(**a, initial_state=s_init, return_final_state=True, **kw)
    return ssd(**a, initial_state=s_init, return_final_state=True, impl=impl, **kw)

  def g(a, dy, ds):
    (y, s), vjp = jax.vjp(f, a)
    return y, s, vjp((dy.astype(y.dtype), ds))[0]
  return g


def check_inputs(smoke):
  """{(dtype name, groups): (args with initial_state, dy, ds, float32 copy of args)}."""
  shape = (1, 64, 4, 16, 16) if smoke else CHECK_SHAPE
  b, l, h, p, n = shape
  data = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    for groups in (1, 2):
      args, dy = make_inputs(jax.random.PRNGKey(1), b, l, h, p, n, groups, dtype)
      s0 = jax.random.normal(jax.random.PRNGKey(2), (b, h, p, n))
      ds = jax.random.normal(jax.random.PRNGKey(3), (b, h, p, n))
      args = dict(args, initial_state=s0)
      f32 = {k: v.astype(jnp.float32) for k, v in args.items()}
      data[(jnp.dtype(dtype).name, groups)] = (shape, args, dy, ds, f32)
  return data


def check_jobs(data):
  jobs = {}
  for (dname, groups), (_, args, dy, ds, f32) in data.items():
    jobs[f"check/{dname}/{groups}/reference"] = (
        _check_fn("reference", {}), _structs((f32, dy.astype(jnp.float32), ds)))
    for name, impl, kw in _check_cases(dname, groups):
      jobs[f"check/{dname}/{groups}/{name}"] = (_check_fn(impl, kw), _structs((args, dy, ds)))
  return jobs


def run_checks(data, exes):
  rows = []
  for (dname, groups), (shape, args, dy, ds, f32) in data.items():
    base = dict(check="vs reference", shape=list(shape), groups=groups, dtype=dname)
    ref_exe = exes.get(f"check/{dname}/{groups}/reference")
    if ref_exe is None or isinstance(ref_exe, Exception):
      rows.append(dict(base, impl="reference", error=f"reference: {ref_exe!r}"[:400], ok=False))
      continue
    ref = ref_exe(f32, dy.astype(jnp.float32), ds)
    for name, _, _ in _check_cases(dname, groups):
      exe = exes.get(f"check/{dname}/{groups}/{name}")
      try:
        if exe is None or isinstance(exe, Exception):
          raise RuntimeError(f"not compiled: {exe!r}"[:400])
        got = exe(args, dy, ds)
        errs = {"y": rel(got[0], ref[0]), "final_state": rel(got[1], ref[1])}
        errs.update({f"d{k}": rel(got[2][k], ref[2][k]) for k in ref[2]})
        finite = all(bool(jnp.all(jnp.isfinite(jnp.asarray(v, jnp.float32))))
                     for v in jax.tree.leaves(got))
        worst = max(errs.values())
        rows.append(dict(base, impl=name, max_rel_err=worst, errors=errs,
                         ok=bool(finite and worst < TOL[dname])))
      except Exception as e:  # noqa: BLE001  (record and keep going)
        traceback.print_exc()
        rows.append(dict(base, impl=name, error=repr(e)[:400], ok=False))
      print(rows[-1], flush=True)
  return rows


def check_at_scale(shape, args, dy, ref_exe, exes, names):
  """Each pallas-family fwd+bwd program (bf16) against the chunked op on float32 copies of the same
  inputs (their first run doubles as warm-up)."""
  rows = []
  try:
    if ref_exe is None or isinstance(ref_exe, Exception):
      raise RuntimeError(f"chunked float32 not compiled: {ref_exe!r}"[:400])
    f32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    y_ref, g_ref = ref_exe(f32, dy.astype(jnp.float32))
    del f32
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    return [dict(check="pallas bf16 vs chunked f32", shape=list(shape), error=repr(e)[:400],
                 ok=False)]
  for name in names:
    exe = exes.get(f"{shape}/{name}/fwdbwd")
    if exe is None or isinstance(exe, Exception):
      continue
    try:
      y, g = exe(args, dy)
      errs = {"y": rel(y, y_ref)}
      errs.update({f"d{k}": rel(g[k], g_ref[k]) for k in g_ref})
      worst = max(errs.values())
      rows.append(dict(check="pallas bf16 vs chunked f32", shape=list(shape), impl=name,
                       max_rel_err=worst, errors=errs, ok=bool(worst < TOL["bfloat16"])))
      del y, g
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      rows.append(dict(check="pallas bf16 vs chunked f32", shape=list(shape), impl=name,
                       error=repr(e)[:400], ok=False))
    print(rows[-1], flush=True)
  return rows


# ---------------------------------------------------------------------------------------- benchmark

def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", required=True)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps (any backend)")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse)")
  ap.add_argument("--no-check", action="store_true")
  ap.add_argument("--variants", action="store_true", help="also time pallas tuning variants")
  ap.add_argument("--shapes", default="8x2048,2x8192,1x65536",
                  help="comma-separated BATCHxLENGTH (24 heads, head_dim 64, d_state 128)")
  ap.add_argument("--budget_s", type=float, default=None,
                  help="seconds from start: no compile starts after 0.6 of it, no check or timed "
                       "row after it (recorded as skipped). Default 360 (3600 with --smoke)")
  ap.add_argument("--workers", type=int, default=12, help="parallel compiles")
  ap.add_argument("--rounds", type=int, default=1,
                  help="time every row once per round, R rounds in turn; report the median round")
  ap.add_argument("--candidates", default=None,
                  help="regex: only the candidate rows whose name matches (default: all)")
  ap.add_argument("--scale-checks-only", action="store_true",
                  help="skip the small-shape checks against the reference; keep the check of "
                       "every pallas row against the float32 chunked op at each benchmark shape")
  opts = ap.parse_args()
  if opts.budget_s is None:
    opts.budget_s = 3600.0 if opts.smoke else 360.0
  t_start = time.time()
  out = pathlib.Path(opts.out)
  out.mkdir(parents=True, exist_ok=True)

  commit = git_commit(opts.commit)
  dev = jax.devices()[0]
  global HBM_TBS, MATMUL_TFS
  ceil = ceilings.for_device(getattr(dev, "device_kind", str(dev)))
  HBM_TBS, MATMUL_TFS = ceil.hbm_tb_s, ceil.matmul_tf_s
  meta = dict(device=getattr(dev, "device_kind", str(dev)), backend=jax.default_backend(),
              jax=jax.__version__, date=str(datetime.date.today()), commit=commit,
              ceilings_source=ceil.source, ceilings=dict(hbm_tb_s=HBM_TBS, bf16_matmul_tf_s=MATMUL_TFS))
  linear_attention, jla_err = _import_jla()
  use_jla = linear_attention is not None and jax.default_backend() == "gpu"
  meta["jax_linear_attention"] = "0.1.0 mosaic_gpu" if linear_attention else f"unavailable: {jla_err}"
  print(meta, flush=True)

  checks, results = [], []

  def save():
    meta["elapsed_s"] = round(time.time() - t_start, 1)
    (out / "ssd.json").write_text(json.dumps(dict(meta=meta, checks=checks, results=results),
                                             indent=1))
    md = render_md(meta, checks, results)
    (out / "ssd.md").write_text(md)
    return md

  shapes = ([(1, 128, 4, 64, 128)] if opts.smoke else
            [(*map(int, bl.split("x")), 24, 64, 128) for bl in opts.shapes.split(",")])
  reps = 2 if opts.smoke else opts.reps

  # The plan: per shape, (row name, function, time the forward too). Rows that change only the
  # backward share the default forward, so only their fwd+bwd is timed. The knob sweep follows the
  # first shape's rows, before the longer shapes.
  plan = {}
  for i, shape in enumerate(shapes):
    rows = [("chunked", ours("chunked"), True), ("pallas", ours("pallas"), True)]
    if use_jla:
      rows.append(("jla simple_gla mosaic_gpu", jla_fn(linear_attention), True))
    rows += [(name, ours("pallas", **_knobs(kw, shape)), fwd) for name, kw, fwd in CANDIDATES
             if opts.candidates is None or re.search(opts.candidates, name)]
    if opts.variants and i == 0:
      rows += [(f"pallas {k}={v}", ours("pallas", **{k: v}), False) for k, v in VARIANTS]
    plan[shape] = rows

  # Every program, compiled up front in parallel (priority order: checks, then shape by shape).
  data = {} if opts.no_check or opts.scale_checks_only else check_inputs(opts.smoke)
  jobs = check_jobs(data)
  for shape, rows in plan.items():
    b, l, h, p, n = shape
    a_s = _structs(jax.eval_shape(lambda: make_inputs(jax.random.PRNGKey(0), b, l, h, p, n, 1,
                                                      jnp.bfloat16)))
    a32 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), a_s)
    if not opts.no_check:
      jobs[f"{shape}/chunked f32/fwdbwd"] = (fwd_and_fwdbwd(ours("chunked"))[1], a32)
    for name, f, with_fwd in rows:
      fwd, fb = fwd_and_fwdbwd(f)
      if with_fwd:
        jobs[f"{shape}/{name}/fwd"] = (fwd, a_s[:1])
      jobs[f"{shape}/{name}/fwdbwd"] = (fb, a_s)
  print(f"{len(jobs)} programs to compile", flush=True)
  exes = compile_all(jobs, opts.workers, t_start + 0.6 * opts.budget_s)
  meta["compile_s"] = round(time.time() - t_start, 1)
  meta["not_compiled"] = sorted(k for k, v in exes.items() if v is None or isinstance(v, Exception))
  save()

  if data:
    checks += run_checks(data, exes)
    save()
  del data

  for shape, rows in plan.items():
    b, l, h, p, n = shape
    args, dy = make_inputs(jax.random.PRNGKey(0), b, l, h, p, n, 1, jnp.bfloat16)
    if not opts.no_check and time.time() - t_start < opts.budget_s:
      names = [name for name, *_ in rows if name.startswith("pallas")]
      checks += check_at_scale(shape, args, dy, exes.get(f"{shape}/chunked f32/fwdbwd"), exes,
                               names)
      save()
    fl = floors(b, l, h, p, n, 1)
    # --rounds R: every row is timed once per round, rounds in sequence, so slow drift of the clocks
    # hits all rows alike; a row's time is the median of its round medians (each round: --reps runs).
    per_round = {}                              # (name, mode) -> [round median ms]
    mins = {}
    errors = {}
    first = len(results)
    for rnd in range(opts.rounds):
      for name, _, _with_fwd in rows:
        if name in errors:
          continue
        try:
          if time.time() - t_start > opts.budget_s:
            raise RuntimeError("skipped: time budget")
          for mode in (("fwd", "fwdbwd") if with_fwd else ("fwdbwd",)):
            exe = exes.get(f"{shape}/{name}/{mode}")
            if exe is None or isinstance(exe, Exception):
              raise RuntimeError(f"{mode} not compiled: {exe!r}"[:400])
            call_args = (args,) if mode == "fwd" else (args, dy)
            ms, ms_min = timing.synchronised(exe, call_args, reps)
            per_round.setdefault((name, mode), []).append(ms)
            per_round.setdefault((name, mode + "_pipe"), []).append(
                timing.pipelined(exe, call_args, reps))
            mins[(name, mode)] = min(ms_min, mins.get((name, mode), ms_min))
        except Exception as e:  # noqa: BLE001
          if "skipped" not in str(e):
            traceback.print_exc()
          if not per_round.get((name, "fwdbwd")):
            errors[name] = repr(e)[:400]
      del results[first:]
      for name, _, _with_fwd in rows:
        row = dict(shape=list(shape), impl=name)
        for mode in ("fwd", "fwdbwd"):
          if (name, mode) in per_round:
            ms = statistics.median(per_round[(name, mode)])
            moved, flops = (fl[0], fl[2]) if mode == "fwd" else (fl[1], fl[3])
            row.update({f"{mode}_ms": ms, f"{mode}_min_ms": mins[(name, mode)],
                        f"{mode}_hbm_frac": moved / (ms * 1e-3) / (HBM_TBS * 1e12),
                        f"{mode}_mma_frac": flops / (ms * 1e-3) / (MATMUL_TFS * 1e12)})
            row[f"{mode}_pipe_ms"] = statistics.median(per_round[(name, mode + "_pipe")])
            if opts.rounds > 1:
              row[f"{mode}_round_ms"] = per_round[(name, mode)]
              row[f"{mode}_pipe_round_ms"] = per_round[(name, mode + "_pipe")]
        if name in errors:
          row["error"] = errors[name]
        results.append(row)
      print(f"round {rnd + 1}/{opts.rounds} of {shape}: " + ", ".join(
          f"{r['impl']} {r.get('fwdbwd_ms', float('nan')):.3f}" for r in results[first:]), flush=True)
      save()
    del args, dy

  print(save())


def _ratio_lines(results, key, label):
  lines = ["", f"Ratios (fwd+bwd, {label}):", ""]
  by = {}
  for r in results:
    if "error" not in r and key in r:
      by.setdefault(tuple(r["shape"][:2]), {})[r["impl"]] = r[key]
  for shp, d in by.items():
    if "pallas" in d:
      parts = [f"chunked/pallas = {d['chunked'] / d['pallas']:.2f}x" if "chunked" in d else None]
      jla = d.get("jla simple_gla mosaic_gpu")
      if jla:
        parts.append(f"pallas/jla = {d['pallas'] / jla:.2f}x")
      lines.append(f"- {shp}: " + ", ".join(p for p in parts if p))
      others = [f"{k[len('pallas '):]} {v / d['pallas']:.3f}" for k, v in d.items()
                if k.startswith("pallas ")]
      if others:
        lines.append("  - variant / default pallas (< 1 is faster): " + ", ".join(others))
  return lines


def render_md(meta, checks, results):
  lines = [f"# SSD benchmark ({meta['device']}, {meta['date']}, commit {meta['commit']}, "
           f"jax {meta['jax']})", "",
           "bf16 inputs, dt float32; heads 24, head_dim 64, d_state 128, n_groups 1; chunk 64. "
           "Median ms over repeated runs after warm-up; fwd+bwd = forward plus VJP. HBM/MMA: "
           f"fraction of {HBM_TBS} TB/s for the fewest bytes, and of {MATMUL_TFS} TF/s for the "
           "chunked algorithm's matmul FLOPs. Pipelined: the same runs dispatched back to back and "
           "synchronised once (ssm_lab/timing.py: device time per call, host round trip overlapped).",
           "",
           f"jax-linear-attention: {meta['jax_linear_attention']}", "",
           f"Compiles done at {meta.get('compile_s', '?')} s; not compiled: "
           f"{', '.join(meta.get('not_compiled', [])) or 'none'}; elapsed {meta.get('elapsed_s')} s.",
           "",
           "| shape (b, L) | impl | fwd ms | fwd+bwd ms | fwd+bwd pipelined ms | fwd+bwd HBM frac "
           "| fwd+bwd MMA frac |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    shp = f"({r['shape'][0]}, {r['shape'][1]})"
    if "error" in r:
      lines.append(f"| {shp} | {r['impl']} | error: {r['error'][:80]} | | | | |")
    else:
      fwd = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else "(= pallas)"
      pipe = f"{r['fwdbwd_pipe_ms']:.3f}" if "fwdbwd_pipe_ms" in r else ""
      lines.append(f"| {shp} | {r['impl']} | {fwd} | {r['fwdbwd_ms']:.3f} | {pipe} | "
                   f"{r['fwdbwd_hbm_frac']:.3f} | {r['fwdbwd_mma_frac']:.4f} |")
  rounds = [r for r in results if "fwdbwd_round_ms" in r]
  if rounds:
    lines += ["", f"fwd+bwd per round (ms, {len(rounds[0]['fwdbwd_round_ms'])} rounds; the table "
              "gives their median):", ""]
    lines += [f"- ({r['shape'][0]}, {r['shape'][1]}) {r['impl']}: "
              + ", ".join(f"{v:.3f}" for v in r["fwdbwd_round_ms"]) for r in rounds]
  for key, label in (("fwdbwd_ms", "synchronised per call"), ("fwdbwd_pipe_ms", "pipelined")):
    lines += _ratio_lines(results, key, label)
  lines += ["", "Correctness (relative Frobenius error):", "",
            "| check | shape | dtype | groups | impl | max rel err | ok |",
            "| --- | --- | --- | --- | --- | ---: | --- |"]
  for c in checks:
    err = f"{c['max_rel_err']:.2e}" if "max_rel_err" in c else c.get("error", "")[:80]
    lines.append(f"| {c['check']} | {tuple(c['shape'])} | {c.get('dtype', 'bfloat16')} | "
                 f"{c.get('groups', 1)} | {c.get('impl', 'pallas')} | {err} | {c['ok']} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
