"""SSD (Mamba-2) on the GPU: correctness at realistic shapes, then forward and forward+backward times.

One script for one device call:
  1. correctness: pallas (and chunked) against the float32 reference at a medium shape (values, final
     state and every gradient), and pallas against the float32 chunked op at the benchmark shapes;
  2. timing: medians of repeated runs after warm-up, bf16, (batch, length) in (8, 2048), (2, 8192),
     (1, 65536) with 24 heads, head_dim 64, d_state 128, one B/C group, for our "chunked" XLA op, our
     "pallas" kernels (default: chunk-parallel backward), "pallas bwd=sequential" (the previous
     backward, same forward: only fwd+bwd timed) and, in the same run, jax-linear-attention 0.1.0's
     Mosaic GPU `simple_gla` (q=C, k=B, v=dt*x, g=dt*A, scale=1), if it is importable. --variants adds
     tuning rows at the first shape.

Writes ssd.json and ssd.md under --out after every row (a run cut short keeps what it finished) and
prints the table last.

  python benchmarks/ssd.py --out /tmp/ssd            # on a GPU
  python benchmarks/ssd.py --out /tmp/ssd --smoke    # tiny shapes, runs anywhere (interpret mode)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import time
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np

HBM_TBS = 2.46      # measured H100 ceilings (the session's common numbers)
TOL = {"float32": 1e-4, "bfloat16": 1e-2}   # relative Frobenius error vs the float32 oracle
MATMUL_TFS = 736.0
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_ssd():
  """Returns (ssd, the ssm_lab.ops.pallas.ssd module). Falls back to loading those two modules alone
  when the package's __init__ (which imports every op and kernel of the shared tree) fails."""
  try:
    import ssm_lab.ops.pallas.ssd as pal
    from ssm_lab.ops import ssd
    return ssd, pal
  except Exception:  # noqa: BLE001  (any breakage elsewhere in the tree: isolate)
    traceback.print_exc()
    print("package import failed; loading ssm_lab.ops.ssd and ssm_lab.ops.pallas.ssd alone")
  for name in list(sys.modules):
    if name.startswith("ssm_lab"):
      del sys.modules[name]
  for pkg, path in (("ssm_lab", "ssm_lab"), ("ssm_lab.ops", "ssm_lab/ops"),
                    ("ssm_lab.ops.pallas", "ssm_lab/ops/pallas")):
    mod = types.ModuleType(pkg)
    mod.__path__ = [str(ROOT / path)]
    sys.modules[pkg] = mod
  sys.modules["ssm_lab.ops.pallas"].interpret_mode = lambda: jax.default_backend() != "gpu"

  def load(name, rel):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

  load("ssm_lab.ops.registry", "ssm_lab/ops/registry.py")
  ssd_mod = load("ssm_lab.ops.ssd", "ssm_lab/ops/ssd.py")
  pal = load("ssm_lab.ops.pallas.ssd", "ssm_lab/ops/pallas/ssd.py")
  return ssd_mod.ssd, pal


ssd, PAL = _import_ssd()
ssd_pallas = PAL.ssd_pallas


def _import_jla():
  try:
    from jla.ops import linear_attention
    return linear_attention, None
  except Exception as e:  # noqa: BLE001  (report why the comparison is missing, keep the rest)
    return None, f"{type(e).__name__}: {e}"


def make_inputs(key, batch, length, heads, head_dim, d_state, groups=1, dtype=jnp.bfloat16):
  """Random inputs in Mamba-2's ranges: dt log-uniform in [1e-3, 1e-1], A = -uniform[1, 16]."""
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


def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------ the functions

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


def fwd_and_fwdbwd(f, dy):
  fwd = jax.jit(lambda a: f(**a)[0])

  def fb(a):
    y, vjp = jax.vjp(lambda a: f(**a)[0], a)
    return y, vjp(dy)[0]
  return fwd, jax.jit(fb)


def time_ms(fn, args, reps, warmup=3):
  for _ in range(warmup):
    jax.block_until_ready(fn(args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(args))
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times), min(times)


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


# Tuning rows for --variants (first shape only): knob of `ssd_pallas`, value. Defaults: segments from
# choose_segments (2 at (8, 2048)), ds_block 16, ds_dtype float32, num_warps_chunk 8, num_warps_ds 4,
# num_stages_ds 3.
VARIANTS = (("segments", 1), ("segments", 4), ("ds_block", 32), ("ds_block", 64),
            ("ds_dtype", "bfloat16"), ("num_warps_chunk", 4), ("num_warps_chunk", 16),
            ("num_warps_ds", 2), ("num_stages_ds", 2))


# ------------------------------------------------------------------------------------------- checks

def correctness(smoke):
  rows = []
  shape = (1, 64, 4, 16, 16) if smoke else (2, 1024, 8, 64, 128)
  for dtype in (jnp.float32, jnp.bfloat16):
    for groups in (1, 2):
      b, l, h, p, n = shape
      args, dy = make_inputs(jax.random.PRNGKey(1), b, l, h, p, n, groups, dtype)
      s0 = jax.random.normal(jax.random.PRNGKey(2), (b, h, p, n))
      ds = jax.random.normal(jax.random.PRNGKey(3), (b, h, p, n))
      f32 = {k: v.astype(jnp.float32) for k, v in args.items()}

      def run(impl, a, **kw):
        def f(a):
          a = dict(a)
          s_init = a.pop("initial_state")
          if impl == "pallas":
            return ssd_pallas(**a, initial_state=s_init, return_final_state=True, **kw)
          return ssd(**a, initial_state=s_init, return_final_state=True, impl=impl, **kw)
        (y, s), vjp = jax.vjp(f, a)
        return y, s, vjp((dy.astype(y.dtype), ds))[0]

      args = dict(args, initial_state=s0)
      f32 = dict(f32, initial_state=s0)

      ref = run("reference", f32)
      cases = [("chunked", {}), ("pallas", {}), ("pallas", {"bwd": "sequential"})]
      if not smoke:
        cases.append(("pallas", {"segments": 4}))
      for impl, kw in cases:
        name = impl + "".join(f" {k}={v}" for k, v in kw.items())
        try:
          got = jax.jit(lambda a, impl=impl, kw=kw: run(impl, a, **kw))(args)
          errs = {"y": rel(got[0], ref[0]), "final_state": rel(got[1], ref[1])}
          errs.update({f"d{k}": rel(got[2][k], ref[2][k]) for k in ref[2]})
          finite = all(bool(jnp.all(jnp.isfinite(jnp.asarray(v, jnp.float32))))
                       for v in jax.tree.leaves(got))
          worst = max(errs.values())
          tol = TOL[jnp.dtype(dtype).name]
          rows.append(dict(check="vs reference", shape=list(shape), groups=groups,
                           dtype=jnp.dtype(dtype).name, impl=name, max_rel_err=worst,
                           errors=errs, ok=bool(finite and worst < tol)))
        except Exception as e:  # noqa: BLE001  (record and keep going)
          traceback.print_exc()
          rows.append(dict(check="vs reference", shape=list(shape), groups=groups,
                           dtype=jnp.dtype(dtype).name, impl=name, error=repr(e)[:400], ok=False))
        print(rows[-1], flush=True)
  return rows


def check_at_scale(shape, args, dy, bwds=("chunked",)):
  """pallas (bf16) against the chunked op on float32 copies of the same inputs, one row per backward."""
  f32 = {k: v.astype(jnp.float32) for k, v in args.items()}
  rows = []
  try:
    _, ref_fb = fwd_and_fwdbwd(ours("chunked"), dy.astype(jnp.float32))
    y_ref, g_ref = ref_fb(f32)
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    return [dict(check="pallas bf16 vs chunked f32", shape=list(shape), error=repr(e)[:400],
                 ok=False)]
  for bwd in bwds:
    name = f"pallas bwd={bwd}"
    try:
      _, fb = fwd_and_fwdbwd(ours("pallas", bwd=bwd), dy)
      y, g = fb(args)
      errs = {"y": rel(y, y_ref)}
      errs.update({f"d{k}": rel(g[k], g_ref[k]) for k in g_ref})
      worst = max(errs.values())
      rows.append(dict(check="pallas bf16 vs chunked f32", shape=list(shape), impl=name,
                       max_rel_err=worst, errors=errs, ok=bool(worst < TOL["bfloat16"])))
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      rows.append(dict(check="pallas bf16 vs chunked f32", shape=list(shape), impl=name,
                       error=repr(e)[:400], ok=False))
  del y_ref, g_ref
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
  opts = ap.parse_args()
  out = pathlib.Path(opts.out)
  out.mkdir(parents=True, exist_ok=True)

  commit = opts.commit
  if commit is None:
    try:
      commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      commit = "unknown"
  dev = jax.devices()[0]
  meta = dict(device=getattr(dev, "device_kind", str(dev)), backend=jax.default_backend(),
              jax=jax.__version__, date=str(datetime.date.today()), commit=commit,
              ceilings=dict(hbm_tb_s=HBM_TBS, bf16_matmul_tf_s=MATMUL_TFS))
  linear_attention, jla_err = _import_jla()
  meta["jax_linear_attention"] = "0.1.0 mosaic_gpu" if linear_attention else f"unavailable: {jla_err}"
  print(meta, flush=True)

  checks, results = [], []

  def save():
    (out / "ssd.json").write_text(json.dumps(dict(meta=meta, checks=checks, results=results),
                                             indent=1))
    md = render_md(meta, checks, results)
    (out / "ssd.md").write_text(md)
    return md

  if not opts.no_check:
    checks += correctness(opts.smoke)
    save()
  shapes = ([(1, 128, 4, 64, 128)] if opts.smoke else
            [(*map(int, bl.split("x")), 24, 64, 128) for bl in opts.shapes.split(",")])
  reps = 2 if opts.smoke else opts.reps
  # (shape, name, function, time the forward too). Rows that change only the backward share the
  # default forward, so only their fwd+bwd is timed. Variants come last: a run cut short by its time
  # limit loses them first.
  plan = []
  for shape in shapes:
    plan += [(shape, "chunked", ours("chunked"), True), (shape, "pallas", ours("pallas"), True),
             (shape, "pallas bwd=sequential", ours("pallas", bwd="sequential"), False)]
    if linear_attention is not None and jax.default_backend() == "gpu":
      plan.append((shape, "jla simple_gla mosaic_gpu", jla_fn(linear_attention), True))
  if opts.variants:
    plan += [(shapes[0], f"pallas {k}={v}", ours("pallas", **{k: v}), False) for k, v in VARIANTS]
  inputs, checked = {}, set()
  for shape, name, f, with_fwd in plan:
    b, l, h, p, n = shape
    if shape not in inputs:
      inputs.clear()                                    # one shape's inputs on the device at a time
      inputs[shape] = make_inputs(jax.random.PRNGKey(0), b, l, h, p, n, 1, jnp.bfloat16)
    args, dy = inputs[shape]
    if not opts.no_check and shape not in checked:
      checked.add(shape)
      checks += check_at_scale(shape, args, dy,
                               ("chunked", "sequential") if shape == shapes[0] else ("chunked",))
      print(checks[-1], flush=True)
      save()
    fb_bytes = floors(b, l, h, p, n, 1)
    row = dict(shape=list(shape), impl=name)
    try:
      fwd, fb = fwd_and_fwdbwd(f, dy)
      if with_fwd:
        row["fwd_ms"], row["fwd_min_ms"] = time_ms(fwd, args, reps)
        row["fwd_hbm_frac"] = fb_bytes[0] / (row["fwd_ms"] * 1e-3) / (HBM_TBS * 1e12)
        row["fwd_mma_frac"] = fb_bytes[2] / (row["fwd_ms"] * 1e-3) / (MATMUL_TFS * 1e12)
      row["fwdbwd_ms"], row["fwdbwd_min_ms"] = time_ms(fb, args, reps)
      row["fwdbwd_hbm_frac"] = fb_bytes[1] / (row["fwdbwd_ms"] * 1e-3) / (HBM_TBS * 1e12)
      row["fwdbwd_mma_frac"] = fb_bytes[3] / (row["fwdbwd_ms"] * 1e-3) / (MATMUL_TFS * 1e12)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      row["error"] = repr(e)[:400]
    results.append(row)
    print(row, flush=True)
    save()

  print(save())


def render_md(meta, checks, results):
  lines = [f"# SSD benchmark ({meta['device']}, {meta['date']}, commit {meta['commit']}, "
           f"jax {meta['jax']})", "",
           "bf16 inputs, dt float32; heads 24, head_dim 64, d_state 128, n_groups 1; chunk 64. "
           "Median ms over repeated runs after warm-up; fwd+bwd = forward plus VJP. HBM/MMA: "
           f"fraction of {HBM_TBS} TB/s for the fewest bytes, and of {MATMUL_TFS} TF/s for the "
           "chunked algorithm's matmul FLOPs.", "",
           f"jax-linear-attention: {meta['jax_linear_attention']}", "",
           "| shape (b, L) | impl | fwd ms | fwd+bwd ms | fwd+bwd HBM frac | fwd+bwd MMA frac |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for r in results:
    shp = f"({r['shape'][0]}, {r['shape'][1]})"
    if "error" in r:
      lines.append(f"| {shp} | {r['impl']} | error: {r['error'][:80]} | | | |")
    else:
      fwd = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else "(= pallas)"
      lines.append(f"| {shp} | {r['impl']} | {fwd} | {r['fwdbwd_ms']:.3f} | "
                   f"{r['fwdbwd_hbm_frac']:.3f} | {r['fwdbwd_mma_frac']:.4f} |")
  lines += ["", "Ratios (fwd+bwd):", ""]
  by = {}
  for r in results:
    if "error" not in r:
      by.setdefault(tuple(r["shape"][:2]), {})[r["impl"]] = r["fwdbwd_ms"]
  for shp, d in by.items():
    if "pallas" in d:
      parts = [f"chunked/pallas = {d['chunked'] / d['pallas']:.2f}x" if "chunked" in d else None]
      jla = d.get("jla simple_gla mosaic_gpu")
      if jla:
        parts.append(f"pallas/jla = {d['pallas'] / jla:.2f}x")
      seq = d.get("pallas bwd=sequential")
      if seq:
        parts.append(f"sequential bwd/chunked bwd (whole fwd+bwd) = {seq / d['pallas']:.2f}x")
      lines.append(f"- {shp}: " + ", ".join(p for p in parts if p))
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
