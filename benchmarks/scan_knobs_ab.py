"""One-run A/B of the selective scan's v6 knobs `pack_bc` and `split_states` against the default.

Per benchmark shape (benchmarks/selective_scan.py's four, bf16, D, z, delta_bias, softplus): forward
and forward+backward, pipelined timing (timing.pipelined), the four configs interleaved round by round
(median over rounds), and each knob's outputs and gradients against the default's (max relative error).

  python benchmarks/scan_knobs_ab.py --out DIR [--smoke]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab.ops.pallas import selective_scan as pss

SHAPES = [(8, 2048, 1536, 16), (2, 8192, 1536, 16), (1, 65536, 2048, 16), (8, 2048, 5120, 16)]
VARIANTS = {"default": {}, "pack_bc": dict(pack_bc=True), "split_states": dict(split_states=True),
            "both": dict(pack_bc=True, split_states=True)}


def inputs(b, L, d, n):
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  bf = jnp.bfloat16
  dt0 = jnp.exp(jax.random.uniform(ks[2], (d,), minval=np.log(1e-3), maxval=np.log(1e-1)))
  return dict(u=jax.random.normal(ks[0], (b, L, d)).astype(bf),
              delta=(0.5 * jax.random.normal(ks[1], (b, L, d))).astype(bf),
              A=-jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)),
              B=jax.random.normal(ks[3], (b, L, 1, n)).astype(bf),
              C=jax.random.normal(ks[4], (b, L, 1, n)).astype(bf),
              D=jnp.ones((d,), jnp.float32), z=jax.random.normal(ks[5], (b, L, d)).astype(bf),
              delta_bias=jnp.log(jnp.expm1(dt0)), dy=jax.random.normal(ks[6], (b, L, d)).astype(bf))


def fns(knobs):
  cfg = pss.Config(**knobs)

  def fwd(x):
    return pss.selective_scan_pallas(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                     delta_bias=x["delta_bias"], delta_softplus=True, config=cfg)

  def fwd_bwd(x):
    def loss(u, delta, B, C, z):
      y = pss.selective_scan_pallas(u, delta, x["A"], B, C, D=x["D"], z=z, delta_bias=x["delta_bias"],
                                    delta_softplus=True, config=cfg)
      return jnp.sum(y.astype(jnp.float32) * x["dy"].astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x["u"], x["delta"], x["B"], x["C"], x["z"])

  return jax.jit(fwd), jax.jit(fwd_bwd)


def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--reps", type=int, default=20)
  a = ap.parse_args()
  shapes = [(2, 64, 64, 16)] if a.smoke else SHAPES
  rounds, reps = (1, 1) if a.smoke else (a.rounds, a.reps)
  os.makedirs(a.out, exist_ok=True)
  t0 = time.time()
  rows = []
  for shape in shapes:
    x = inputs(*shape)
    progs = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:      # compile the 8 programs at once
      futs = {(v, k): pool.submit(lambda f: f.lower(x).compile(), f)
              for v, knobs in VARIANTS.items() for k, f in zip(("fwd", "fwd_bwd"), fns(knobs))}
      progs = {key: f.result() for key, f in futs.items()}
    print(f"[{time.time() - t0:.0f}s] {shape} compiled", flush=True)
    outs = {key: jax.block_until_ready(exe(x)) for key, exe in progs.items()}
    times = {key: [] for key in progs}
    for _ in range(rounds):
      for key, exe in progs.items():
        jax.block_until_ready(exe(x))
        t = time.perf_counter()
        o = None
        for _ in range(reps):
          o = exe(x)
        jax.block_until_ready(o)
        times[key].append((time.perf_counter() - t) * 1e3 / reps)
    for v in VARIANTS:
      err_f = rel(outs[(v, "fwd")], outs[("default", "fwd")])
      err_b = max(rel(g, g0) for g, g0 in zip(outs[(v, "fwd_bwd")], outs[("default", "fwd_bwd")]))
      row = dict(shape=list(shape), variant=v, fwd_ms=statistics.median(times[(v, "fwd")]),
                 fwd_bwd_ms=statistics.median(times[(v, "fwd_bwd")]), err_fwd_vs_default=err_f,
                 err_grads_vs_default=err_b)
      rows.append(row)
      print(json.dumps(row), flush=True)
  base = {tuple(r["shape"]): r for r in rows if r["variant"] == "default"}
  lines = [f"# selective_scan v6 knobs A/B ({jax.devices()[0].device_kind}, "
           f"{datetime.date.today()}, pipelined, median of {rounds} rounds x {reps} calls)", "",
           "| shape | variant | fwd ms | fwd+bwd ms | fwd+bwd vs default | max rel err vs default |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    b0 = base[tuple(r["shape"])]
    lines.append(f"| {tuple(r['shape'])} | {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                 f"{r['fwd_bwd_ms'] / b0['fwd_bwd_ms']:.3f} | "
                 f"{max(r['err_fwd_vs_default'], r['err_grads_vs_default']):.1e} |")
  with open(os.path.join(a.out, "scan_knobs_ab.json"), "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, date=str(datetime.date.today()), rows=rows), f,
              indent=1)
  with open(os.path.join(a.out, "scan_knobs_ab.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
