"""Attention on the GPU: correctness at realistic shapes, tile tuning, and the benchmark table.

Run on the device machine (H100):
  PYTHONUNBUFFERED=1 python -m benchmarks.attention --out $OUT [--phases check,tune,bench]

  check  pallas / cudnn / JAX's deprecated Pallas mha / decode-xla against the float32 reference
         (highest matmul precision) at realistic shapes: values and gradients (rel. L2 error).
  tune   a few tile configs of the Pallas kernel at 16K tokens, dims 64 and 128; `bench` then uses
         the fastest fwd and bwd tiles (they become `default_config` in ssm_lab/ops/pallas/attention.py).
  bench  forward and forward+backward, causal bf16, 32K tokens per batch (batch = 32768 / length, at
         least 1) at lengths 1K..64K, 16 heads, dims 64 and 128, impls xla (where its L x L logits fit),
         cudnn, pallas and `jax.experimental.pallas.ops.gpu.attention.mha`; plus GQA (4 KV heads) and
         sliding window 1024 at dim 64. Each pallas/mha/xla result is compared with cudnn's.

Writes attention.json and attention.md under --out; prints the table last. Causal FLOPs are counted
as 4*b*h*d*(visible pairs), visible pairs = L*(L+1)/2 for full causal; backward = 2.5x forward.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import pathlib
import statistics
import sys
import time
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
from ssm_lab.provenance import git_commit  # noqa: E402

from benchmarks import ceilings  # noqa: E402

PEAK_TFLOPS = 736.0  # measured bf16 matmul ceiling of the chip: set in main() from ceilings.py
TOKENS = 32768
HEADS = 16
SMOKE = 1  # --smoke divides every length by 16 (CPU interpret-mode dry run of the script itself)


def load_attention_modules():
  """Imports ssm_lab.ops.attention and the Pallas kernel; if the package __init__ fails (another
  module of the shared tree mid-edit), loads just these two modules."""
  try:
    importlib.import_module("ssm_lab.ops")
  except Exception as e:  # noqa: BLE001  (any error in someone else's module)
    print(f"ssm_lab.ops failed to import ({type(e).__name__}: {e}); loading attention alone")
    for name in [n for n in sys.modules if n.startswith("ssm_lab.ops")]:
      del sys.modules[name]
    for pkg, path in (("ssm_lab.ops", ROOT / "ssm_lab/ops"),
                      ("ssm_lab.ops.pallas", ROOT / "ssm_lab/ops/pallas")):
      mod = types.ModuleType(pkg)
      mod.__path__ = [str(path)]
      sys.modules[pkg] = mod
    sys.modules["ssm_lab.ops.pallas"].interpret_mode = lambda: jax.default_backend() != "gpu"
    importlib.import_module("ssm_lab.ops.attention")
    importlib.import_module("ssm_lab.ops.pallas.attention")
  return sys.modules["ssm_lab.ops.attention"], sys.modules["ssm_lab.ops.pallas.attention"]


A, PA = load_attention_modules()


def load_mha():
  try:
    from jax.experimental.pallas.ops.gpu import attention as mha_mod
  except ImportError as e:
    print(f"jax.experimental.pallas.ops.gpu.attention unavailable: {e}")
    return None
  return mha_mod.mha


MHA = load_mha()


def rel(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attn_fn(impl: str, *, causal=True, window=None, seg=None, config=None):
  """(q, k, v) -> out for one impl name (ours, 'mha' baseline or 'pallas_cfg' with tiles)."""
  if impl == "mha":
    def f(q, k, v):
      return MHA(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)
    return f
  if config is not None:
    def f(q, k, v):
      return PA.flash_attention(q, k, v, causal=causal, sliding_window=window, segment_ids=seg,
                                config=config)
    return f

  def f(q, k, v):
    return A.attention(q, k, v, causal=causal, sliding_window=window, segment_ids=seg, impl=impl)
  return f


def fwd_bwd(f):
  def g(q, k, v, do):
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + tuple(vjp(do))
  return g


def inputs(key, b, lq, lk, h, kh, d, dtype):
  ks = jax.random.split(key, 4)
  q = jax.random.normal(ks[0], (b, lq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, lk, kh, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, lk, kh, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, lq, h, d), jnp.float32).astype(dtype)
  return q, k, v, do


def time_fn(fn, args, samples=7, target_s=0.03) -> float:
  """Median seconds per call (after compile + warm-up), samples of several back-to-back calls."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t0
  inner = max(1, min(20, int(target_s / max(one, 1e-6))))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def visible_pairs(lq, lk, causal, window):
  if not causal:
    return lq * lk
  total = 0
  off = lk - lq
  for i in range(lq):  # only used at bench sizes (<= 64K rows): cheap enough
    hi = min(i + off, lk - 1)
    lo = 0 if window is None else max(0, i + off - window + 1)
    total += max(0, hi - lo + 1)
  return total


# ------------------------------------------------------------------------------------------------

def phase_check(results):
  print("== check: rel. L2 error vs float32 reference (highest precision) ==")
  cases = [
      # name, b, lq, lk, h, kh, d, dtype, causal, window, seg, impls
      ("causal d64", 1, 2048, 2048, 8, 8, 64, jnp.bfloat16, True, None, False,
       ["pallas", "cudnn", "mha", "xla"]),
      ("causal d128 gqa 8/2", 1, 2048, 2048, 8, 2, 128, jnp.bfloat16, True, None, False,
       ["pallas", "cudnn"]),
      ("window 256 d64", 1, 2048, 2048, 4, 4, 64, jnp.bfloat16, True, 256, False,
       ["pallas", "cudnn", "xla"]),
      ("mqa window 100 d128 L1000", 2, 1000, 1000, 8, 1, 128, jnp.bfloat16, True, 100, False,
       ["pallas", "cudnn"]),
      ("non-causal d64", 2, 1024, 1024, 4, 2, 64, jnp.bfloat16, False, None, False,
       ["pallas", "cudnn"]),
      ("segments d128", 2, 1024, 1024, 4, 4, 128, jnp.bfloat16, True, None, True, ["pallas", "xla"]),
      ("q 384 < kv 1536 d64", 1, 384, 1536, 4, 4, 64, jnp.bfloat16, True, None, False,
       ["pallas", "xla"]),
      ("f32 causal d64", 1, 1024, 1024, 4, 2, 64, jnp.float32, True, None, False, ["pallas"]),
      ("f32 window 64 d128", 1, 512, 512, 4, 4, 128, jnp.float32, True, 64, False, ["pallas"]),
  ]
  key = jax.random.PRNGKey(1)
  for name, b, lq, lk, h, kh, d, dtype, causal, window, use_seg, impls in cases:
    lq, lk = lq // SMOKE, lk // SMOKE
    key, sub, sk = jax.random.split(key, 3)
    q, k, v, do = inputs(sub, b, lq, lk, h, kh, d, dtype)
    seg = (jnp.sort(jax.random.randint(sk, (b, lq), 0, 4), axis=1) if use_seg else None)
    with jax.default_matmul_precision("highest"):
      ref = jax.jit(fwd_bwd(attn_fn("reference", causal=causal, window=window, seg=seg)))(
          q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
          do.astype(jnp.float32))
    # bf16 operands: ~2e-3 seen; float32 inputs: the GPU matmuls run in TF32 (~4e-4 seen).
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    for impl in impls:
      row = dict(phase="check", case=name, impl=impl, dtype=jnp.dtype(dtype).name)
      try:
        got = jax.jit(fwd_bwd(attn_fn(impl, causal=causal, window=window, seg=seg)))(q, k, v, do)
        errs = [rel(g, r) for g, r in zip(got, ref, strict=True)]
        row.update(err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3],
                   ok=bool(all(e < tol for e in errs) and all(math.isfinite(e) for e in errs)))
      except Exception as e:  # noqa: BLE001  (record and go on)
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
      results.append(row)
      print(f"  {name:28s} {impl:7s} " + (
          f"out {row['err_out']:.1e} dq {row['err_dq']:.1e} dk {row['err_dk']:.1e} "
          f"dv {row['err_dv']:.1e} {'OK' if row['ok'] else 'FAIL'}" if "err_out" in row
          else row.get("error", "")))

  # Decoding: xla vs reference at a realistic cache, ring buffer with a window.
  try:
    key, *ks = jax.random.split(key, 5)
    b, lq, lc, h, kh, d = 4, 4, 4096 // SMOKE, 16, 4, 128
    q = jax.random.normal(ks[0], (b, lq, h, d)).astype(jnp.bfloat16)
    kc = jax.random.normal(ks[1], (b, lc, kh, d)).astype(jnp.bfloat16)
    vc = jax.random.normal(ks[2], (b, lc, kh, d)).astype(jnp.bfloat16)
    filled = jnp.array([100, lc, lc * 3 // 4, lc])[:, None]
    kv_pos = jnp.where(jnp.arange(lc)[None] < filled, jnp.arange(lc)[None] + 5000, -1)
    q_pos = jnp.broadcast_to(jnp.arange(lq)[None] + 5000 + filled - lq, (b, lq)).astype(jnp.int32)
    outs = {}
    for impl in ("reference", "xla"):
      with jax.default_matmul_precision("highest"):
        outs[impl] = jax.jit(lambda q, kc, vc, qp, kp, impl=impl: A.attention_decode(
            q, kc, vc, q_positions=qp, kv_positions=kp, sliding_window=1024, impl=impl))(
                q, kc, vc, q_pos, kv_pos.astype(jnp.int32))
    err = rel(outs["xla"], outs["reference"])
    results.append(dict(phase="check", case="decode ring window 1024", impl="xla", err_out=err,
                        ok=err < 2e-2))
    print(f"  {'decode window 1024':28s} xla     out {err:.1e} {'OK' if err < 2e-2 else 'FAIL'}")
  except Exception as e:  # noqa: BLE001
    results.append(dict(phase="check", case="decode", impl="xla", ok=False, error=str(e)[:300]))
    traceback.print_exc()


# ------------------------------------------------------------------------------------------------

def tune_candidates(d):
  K = PA.KernelConfig
  if d == 64:
    fwd = [K(128, 64, 4, 3), K(128, 128, 8, 3), K(128, 64, 8, 3), K(64, 64, 4, 3), K(128, 32, 4, 4)]
    bwd = [(K(128, 64, 8, 2), K(128, 64, 8, 2)), (K(128, 32, 4, 3), K(128, 32, 4, 3)),
           (K(64, 64, 4, 3), K(64, 64, 4, 3)), (K(128, 64, 4, 3), K(128, 64, 4, 3)),
           (K(128, 32, 8, 2), K(64, 64, 4, 2))]
  else:
    fwd = [K(128, 64, 8, 3), K(128, 128, 8, 2), K(64, 64, 4, 3), K(128, 32, 4, 3), K(128, 64, 4, 2)]
    bwd = [(K(64, 64, 4, 2), K(64, 64, 4, 2)), (K(128, 32, 8, 2), K(128, 32, 8, 2)),
           (K(64, 32, 4, 3), K(64, 32, 4, 3)), (K(128, 64, 8, 2), K(128, 64, 8, 2)),
           (K(64, 64, 8, 2), K(128, 32, 8, 2))]
  return fwd, bwd


def phase_tune(results, tuned):
  print("== tune: pallas tiles at L=16384, b=2, 16 heads, causal bf16 ==")
  length = 16384 // SMOKE
  b = TOKENS // SMOKE // length
  for d in (64, 128):
    q, k, v, do = inputs(jax.random.PRNGKey(d), b, length, length, HEADS, HEADS, d, jnp.bfloat16)
    flops = 4 * b * HEADS * d * visible_pairs(length, length, True, None)
    base = PA.default_config(d)
    fwd_c, bwd_c = tune_candidates(d)
    best_fwd = (math.inf, base.fwd)
    for kc in fwd_c:
      cfg = PA.FlashConfig(fwd=kc, dkdv=base.dkdv, dq=base.dq)
      try:
        t = time_fn(jax.jit(attn_fn("pallas", config=cfg)), (q, k, v), samples=5)
        best_fwd = min(best_fwd, (t, kc), key=lambda x: x[0])
        results.append(dict(phase="tune", d=d, kernel="fwd", config=str(kc), ms=t * 1e3,
                            tflops=flops / t / 1e12))
        print(f"  d{d} fwd  {kc}  {t * 1e3:7.2f} ms  {flops / t / 1e12:6.1f} TF/s")
      except Exception as e:  # noqa: BLE001
        print(f"  d{d} fwd  {kc}  FAILED {type(e).__name__}: {str(e)[:200]}")
    best_bwd = (math.inf, (base.dkdv, base.dq))
    for dkdv, dq in bwd_c:
      cfg = PA.FlashConfig(fwd=best_fwd[1], dkdv=dkdv, dq=dq)
      try:
        t = time_fn(jax.jit(fwd_bwd(attn_fn("pallas", config=cfg))), (q, k, v, do), samples=5)
        best_bwd = min(best_bwd, (t, (dkdv, dq)), key=lambda x: x[0])
        results.append(dict(phase="tune", d=d, kernel="fwd+bwd", config=f"dkdv={dkdv} dq={dq}",
                            ms=t * 1e3, tflops=3.5 * flops / t / 1e12))
        print(f"  d{d} f+b  dkdv={dkdv} dq={dq}  {t * 1e3:7.2f} ms  "
              f"{3.5 * flops / t / 1e12:6.1f} TF/s")
      except Exception as e:  # noqa: BLE001
        print(f"  d{d} f+b  dkdv={dkdv} dq={dq}  FAILED {type(e).__name__}: {str(e)[:200]}")
    cfg = PA.FlashConfig(fwd=best_fwd[1], dkdv=best_bwd[1][0], dq=best_bwd[1][1])
    for order in (True, False):
      c2 = PA.FlashConfig(fwd=cfg.fwd, dkdv=cfg.dkdv, dq=cfg.dq, blocks_fastest=order)
      try:
        t = time_fn(jax.jit(fwd_bwd(attn_fn("pallas", config=c2))), (q, k, v, do), samples=5)
        results.append(dict(phase="tune", d=d, kernel="fwd+bwd", config=f"blocks_fastest={order}",
                            ms=t * 1e3, tflops=3.5 * flops / t / 1e12))
        print(f"  d{d} f+b  blocks_fastest={order}  {t * 1e3:7.2f} ms")
        if order is False and t < best_bwd[0] * 0.97:
          cfg = c2
      except Exception as e:  # noqa: BLE001
        print(f"  d{d} order {order} FAILED {type(e).__name__}: {str(e)[:200]}")
    tuned[d] = cfg
    print(f"  d{d} chosen: {cfg}")


# ------------------------------------------------------------------------------------------------

def xla_fits(b, h, length):
  # fwd keeps f32 logits and probabilities of [b, h, L, L]; the backward about twice that.
  return 3 * b * h * length * length * 4 < 40e9


def phase_bench(results, tuned, lengths, dump=None):
  print("== bench: causal bf16, 16 heads ==")
  # Most telling first (d64 full, then its sliding window), in case the run is cut short.
  cases = [dict(d=64, length=n, kh=HEADS, window=None, variant="mha") for n in lengths]
  cases += [dict(d=64, length=n, kh=HEADS, window=1024, variant="window1024") for n in lengths]
  cases += [dict(d=128, length=n, kh=HEADS, window=None, variant="mha") for n in lengths]
  cases += [dict(d=64, length=n, kh=4, window=None, variant="gqa4") for n in lengths]
  for c in cases:
    if dump is not None:
      dump()
    d, length, kh, window, variant = c["d"], c["length"], c["kh"], c["window"], c["variant"]
    b = max(1, TOKENS // SMOKE // length)
    q, k, v, do = inputs(jax.random.PRNGKey(length + d), b, length, length, HEADS, kh, d,
                         jnp.bfloat16)
    flops = 4 * b * HEADS * d * visible_pairs(length, length, True, window)
    impls = ["cudnn", "pallas"]
    if variant == "mha":
      impls.append("mha")
    impls.append("xla")
    ref_out = {}
    for passes in ("fwd", "fwd+bwd"):
      for impl in impls:
        row = dict(phase="bench", variant=variant, d=d, length=length, batch=b, heads=HEADS,
                   kv_heads=kh, window=window, impl=impl, passes=passes)
        if impl == "xla" and not xla_fits(b, HEADS, length):
          row["skipped"] = (f"xla materialises [b, h, L, L] float32: "
                            f"{3 * b * HEADS * length * length * 4 / 1e9:.0f} GB")
          results.append(row)
          continue
        cfg = tuned.get(d) if impl == "pallas" else None
        f = attn_fn(impl, window=window, config=cfg)
        fn = jax.jit(f if passes == "fwd" else fwd_bwd(f))
        args = (q, k, v) if passes == "fwd" else (q, k, v, do)
        try:
          t = time_fn(fn, args)
          fl = flops if passes == "fwd" else 3.5 * flops
          row.update(ms=t * 1e3, tflops=fl / t / 1e12, frac_peak=fl / t / 1e12 / PEAK_TFLOPS)
          out = fn(*args)
          out = out if isinstance(out, tuple) else (out,)
          if impl == "cudnn":
            ref_out[passes] = out
          elif passes in ref_out:
            errs = [rel(o, r) for o, r in zip(out, ref_out[passes], strict=True)]
            row["err_vs_cudnn"] = max(errs)
          del out
        except Exception as e:  # noqa: BLE001  (OOM or unsupported: record, go on)
          row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        results.append(row)
        msg = (f"{row['ms']:9.3f} ms {row['tflops']:6.1f} TF/s" if "ms" in row
               else row.get("error", row.get("skipped")))
        err = f"  err {row['err_vs_cudnn']:.1e}" if "err_vs_cudnn" in row else ""
        print(f"  {variant:10s} d{d} L{length:6d} b{b:2d} {passes:8s} {impl:7s} {msg}{err}")
    del ref_out


def markdown(meta, results):
  lines = [f"# Attention benchmark ({meta['device']})", "",
           f"date {meta['date']}, commit `{meta['commit']}`, jax {meta['jax']}, "
           f"peak {PEAK_TFLOPS:.0f} TF/s bf16. Causal, bf16, {HEADS} heads, "
           f"batch = max(1, 32768 / L). TFLOP/s count visible pairs only "
           f"(4*b*h*d*pairs fwd, 3.5x for fwd+bwd). `x cuDNN` = time / cuDNN time.", ""]
  bench = [r for r in results if r["phase"] == "bench"]
  for variant in ("mha", "gqa4", "window1024"):
    for d in (64, 128):
      rows = [r for r in bench if r["variant"] == variant and r["d"] == d]
      if not rows:
        continue
      title = {"mha": "16 heads", "gqa4": "GQA, 4 KV heads", "window1024": "sliding window 1024"}
      lines += [f"## {title[variant]}, head dim {d}", "",
                "| L | batch | pass | impl | ms | TFLOP/s | % peak | x cuDNN | max rel err vs cuDNN |",
                "|---|---|---|---|---|---|---|---|---|"]
      for r in rows:
        cud = next((c for c in rows if c["impl"] == "cudnn" and c["length"] == r["length"]
                    and c["passes"] == r["passes"] and "ms" in c), None)
        if "ms" in r:
          ratio = f"{r['ms'] / cud['ms']:.2f}" if cud else ""
          err = f"{r['err_vs_cudnn']:.1e}" if "err_vs_cudnn" in r else ""
          lines.append(f"| {r['length']} | {r['batch']} | {r['passes']} | {r['impl']} | "
                       f"{r['ms']:.3f} | {r['tflops']:.1f} | {100 * r['frac_peak']:.1f} | {ratio} "
                       f"| {err} |")
        else:
          lines.append(f"| {r['length']} | {r['batch']} | {r['passes']} | {r['impl']} | "
                       f"{r.get('skipped') or r.get('error')} | | | | |")
      lines.append("")
  checks = [r for r in results if r["phase"] == "check"]
  if checks:
    lines += ["## Correctness (rel. L2 error vs float32 reference)", "",
              "| case | impl | out | dq | dk | dv | ok |", "|---|---|---|---|---|---|---|"]
    for r in checks:
      vals = [f"{r[k]:.1e}" if k in r else "" for k in ("err_out", "err_dq", "err_dk", "err_dv")]
      lines.append(f"| {r['case']} | {r['impl']} | " + " | ".join(vals) +
                   f" | {r['ok']}{' ' + r['error'] if 'error' in r else ''} |")
    lines.append("")
  tune = [r for r in results if r["phase"] == "tune"]
  if tune:
    lines += ["## Pallas tile tuning (L=16384, b=2)", "", "| d | kernel | config | ms | TFLOP/s |",
              "|---|---|---|---|---|"]
    for r in tune:
      lines.append(f"| {r['d']} | {r['kernel']} | {r['config']} | {r['ms']:.2f} | "
                   f"{r['tflops']:.1f} |")
    lines.append("")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--phases", default="check,tune,bench")
  ap.add_argument("--lengths", default="1024,4096,16384,65536")
  ap.add_argument("--smoke", action="store_true", help="lengths / 16: a CPU dry run")
  args = ap.parse_args()
  global SMOKE
  SMOKE = 16 if args.smoke else 1
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  dev = jax.devices()[0]
  global PEAK_TFLOPS
  PEAK_TFLOPS = ceilings.for_device(dev.device_kind).matmul_tf_s
  meta = dict(device=f"{dev.device_kind}", date=datetime.date.today().isoformat(),
              commit=git_commit(), jax=jax.__version__, backend=jax.default_backend(),
              mha_available=MHA is not None)
  print(meta)
  results, tuned = [], {}
  phases = args.phases.split(",")
  lengths = [int(x) // SMOKE for x in args.lengths.split(",")]

  def dump():
    (out / "attention.json").write_text(json.dumps(
        dict(meta=meta, tuned={str(d): str(c) for d, c in tuned.items()}, results=results),
        indent=1))
    (out / "attention.md").write_text(markdown(meta, results))

  for phase, fn in (("check", lambda: phase_check(results)),
                    ("tune", lambda: phase_tune(results, tuned)),
                    ("bench", lambda: phase_bench(results, tuned, lengths, dump))):
    if phase in phases:
      t0 = time.time()
      try:
        fn()
      except Exception:  # noqa: BLE001  (keep what the other phases found)
        traceback.print_exc()
      print(f"-- {phase} took {time.time() - t0:.0f} s")
      dump()
  print(markdown(meta, [r for r in results if r["phase"] == "bench"]))


if __name__ == "__main__":
  main()
