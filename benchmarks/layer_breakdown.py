"""Where a training step's time goes inside one layer: forward and forward+backward of each sub-part.

One script for one device call. At the train_throughput 350M shapes (d_model 1024, length 2048, bf16
compute, float32 parameters cast per use as flax's Dense does) it times, for
  mamba1  (MambaMixer: d_inner 2048, d_state 16, dt_rank 64): in_proj, conv+silu, x_proj+dt_proj,
          selective_scan (impl auto), out_proj, the whole mixer;
  mamba2  (Mamba2Mixer: 32 heads x 64, d_state 128, 1 group, chunk 64): in_proj, conv+silu, ssd
          (impl auto), gated_norm, out_proj, the whole mixer;
  attn    (CausalSelfAttention: 16 heads x 64): qkv_proj, rope, attention (impl auto), o_proj, the
          whole layer;
  mlp     (SwiGLU, d_ff 2752) and the pre-norm RMSNorm;
plus, for comparison in the same run, the depthwise conv as the grouped lax convolution the mixers
used before (part "conv+silu [grouped]" and "layer [grouped conv]"), and a check that the two conv
formulations agree at full size (outputs and every gradient).

Each part is a function of its arrays, passed as jit arguments (nothing closed over for XLA to fold);
forward = the function, fwd+bwd = the function plus its VJP for a random cotangent w.r.t. every float
input (activations and parameters, as in training). Programs are lowered in the main thread and
compiled in a thread pool up front. Times are medians over --reps repeats of back-to-back calls
(enough calls per repeat to last ~20 ms, so dispatch does not dominate sub-millisecond parts) after
warm-up. Each row also records XLA's cost analysis (flops, bytes accessed; Pallas custom calls count
as their operands at most) and the roofline time max(flops / 736 TF/s, bytes / 2.46 TB/s), the
measured H100 ceilings. The markdown ends with a per-model projection (layers x per-layer fwd+bwd)
against the measured train_throughput step times. Writes layer_breakdown.json and layer_breakdown.md
under --out after every row.

  python -m benchmarks.layer_breakdown --out /tmp/lb            # on a GPU (~2-3 minutes)
  python -m benchmarks.layer_breakdown --out /tmp/lb --smoke    # tiny shapes, any backend
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import json
import os
import pathlib
import statistics
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab import ops  # noqa: E402
from ssm_lab.layers import mamba as mamba_mod  # noqa: E402
from ssm_lab.layers.attention import CausalSelfAttention, apply_rope  # noqa: E402
from ssm_lab.layers.mamba import CausalDepthwiseConv1d, MambaMixer  # noqa: E402
from ssm_lab.layers.mamba2 import GatedRMSNorm, Mamba2Mixer  # noqa: E402
from ssm_lab.layers.mlp import SwiGLU, default_d_ff  # noqa: E402
from ssm_lab.layers.norm import RMSNorm  # noqa: E402
from ssm_lab.provenance import git_commit  # noqa: E402

from benchmarks import ceilings  # noqa: E402

HBM_TBS = 2.46        # ceilings of the chip that runs: set in main() from benchmarks/ceilings.py
MATMUL_TFS = 736.0
BF16, F32 = jnp.bfloat16, jnp.float32
# train_throughput.py's 350M cases measured on the H100 (its train_throughput.md of 2026-11-23,
# commit 91f8ac3, in git history):
# (layers of each kind, batch, step ms).
MODELS = {"transformer-350m": (dict(attn=24, mlp=24, norm=48), 16, 194.0),
          "mamba-350m": (dict(mamba1=48, norm=48), 8, 499.0),
          "mamba2-350m": (dict(mamba2=48, norm=48), 8, 441.0)}


def grouped_conv(xs: jax.Array, kernel: jax.Array, bias: jax.Array, out_dtype: Any) -> jax.Array:
  """The formulation the mixers used before: lax's grouped conv (flax nn.Conv with
  feature_group_count = ch), same signature as mamba.shifted_depthwise_conv."""
  y = jax.lax.conv_general_dilated(xs, kernel, window_strides=(1,), padding="VALID",
                                   dimension_numbers=("NWC", "WIO", "NWC"),
                                   feature_group_count=xs.shape[-1])
  return (y + bias).astype(out_dtype)


@contextlib.contextmanager
def grouped_conv_in_layers():
  """While tracing: the mixers' conv goes through `grouped_conv` (the pre-fix layers)."""
  saved = mamba_mod.shifted_depthwise_conv
  mamba_mod.shifted_depthwise_conv = grouped_conv
  try:
    yield
  finally:
    mamba_mod.shifted_depthwise_conv = saved


# ---- candidate formulations (timed and checked against the layers' autodiff versions)

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_silu_vjp(xs, kernel, bias, out_dtype):
  """Candidate: silu(shifted_depthwise_conv(xs, kernel, bias)) with a hand-written VJP whose only
  residuals are the inputs (the backward recomputes the pre-activation from bf16 xs) and whose
  kernel gradient is 4 reductions of one recomputed float32 product each."""
  return _conv_silu_fwd(xs, kernel, bias, out_dtype)[0]

def _acc(xs, kernel, bias):
  k = kernel.shape[0]
  length = xs.shape[1] - (k - 1)
  acc = bias.astype(F32)
  for i in range(k):
    acc = acc + xs[:, i:i + length].astype(F32) * kernel[i, 0].astype(F32)
  return acc

def _conv_silu_fwd(xs, kernel, bias, out_dtype):
  return jax.nn.silu(_acc(xs, kernel, bias)).astype(out_dtype), (xs, kernel, bias)

def _conv_silu_bwd(out_dtype, res, dy):
  xs, kernel, bias = res
  k = kernel.shape[0]
  length = xs.shape[1] - (k - 1)
  acc = _acc(xs, kernel, bias)
  sg = jax.nn.sigmoid(acc)
  da = dy.astype(F32) * sg * (1.0 + acc * (1.0 - sg))            # [b, L, ch]
  dpad = jnp.pad(da, ((0, 0), (k - 1, k - 1), (0, 0)))
  dxs = sum(dpad[:, k - 1 - i:k - 1 - i + xs.shape[1]] * kernel[i, 0].astype(F32) for i in range(k))
  dk = jnp.stack([jnp.sum(da * xs[:, i:i + length].astype(F32), axis=(0, 1)) for i in range(k)])
  return (dxs.astype(xs.dtype), dk[:, None, :].astype(kernel.dtype),
          jnp.sum(da, axis=(0, 1)).astype(bias.dtype))

conv_silu_vjp.defvjp(_conv_silu_fwd, _conv_silu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def gated_norm_vjp(scale, y, z, n_groups, eps, out_dtype):
  """Candidate: GatedRMSNorm (rmsnorm_per_group(y * silu(z)) * scale) with a hand-written VJP whose
  residuals are y, z (bf16) and the float32 [..., n_groups] inverse RMS."""
  return _gn_fwd(scale, y, z, n_groups, eps, out_dtype)[0]

def _gn_h(y, z, n_groups):
  h = y.astype(F32) * jax.nn.silu(z.astype(F32))
  return h.reshape(*h.shape[:-1], n_groups, h.shape[-1] // n_groups)

def _gn_fwd(scale, y, z, n_groups, eps, out_dtype):
  hg = _gn_h(y, z, n_groups)
  r = jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + eps)
  out = (hg * r).reshape(y.shape) * scale.astype(F32)
  return out.astype(out_dtype), (scale, y, z, r)

def _gn_bwd(n_groups, eps, out_dtype, res, dout):
  scale, y, z, r = res
  hg = _gn_h(y, z, n_groups)
  nrm = hg * r                                                     # [..., G, d/G]
  g = (dout.astype(F32) * scale.astype(F32)).reshape(nrm.shape)
  dh = r * (g - nrm * jnp.mean(g * nrm, axis=-1, keepdims=True))
  dh = dh.reshape(y.shape)
  zf = z.astype(F32)
  sg = jax.nn.sigmoid(zf)
  dy = dh * zf * sg
  dz = dh * y.astype(F32) * sg * (1.0 + zf * (1.0 - sg))
  dscale = jnp.sum((dout.astype(F32) * nrm.reshape(y.shape)).reshape(-1, y.shape[-1]), axis=0)
  return dscale.astype(scale.dtype), dy.astype(y.dtype), dz.astype(z.dtype)

gated_norm_vjp.defvjp(_gn_fwd, _gn_bwd)


def dense(x, w):
  """flax Dense/DenseGeneral in bf16 compute: the float32 kernel cast, then one bf16 dot."""
  return jnp.tensordot(x, w.astype(x.dtype), axes=1)


class Shapes:
  def __init__(self, smoke: bool, batch: int, length: int):
    if smoke:
      self.b, self.L, self.d = 2, 64, 64
      self.m1 = dict(d_state=16)
      self.m2 = dict(d_state=16, head_dim=16, chunk_size=16)
      self.heads, self.head_dim = 4, 16
    else:
      self.b, self.L, self.d = batch, length, 1024
      self.m1 = dict(d_state=16)
      self.m2 = dict(d_state=128, head_dim=64, chunk_size=64)
      self.heads, self.head_dim = 16, 64


def _init(module, x, *extra):
  """Parameters (float32) of `module` for activations like x (initialised on a short slice)."""
  return jax.jit(module.init)(jax.random.PRNGKey(0), x[:, :16], *[e[:, :16] for e in extra])


def build_cases(s: Shapes) -> list[tuple[str, str, Callable, tuple, bool]]:
  """[(group, part, fn, args, grouped_conv)]: fn(*args) -> array or tuple of arrays."""
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  rnd = lambda *shape, scale=1.0, dtype=BF16: (
      scale * jax.random.normal(next(keys), shape, F32)).astype(dtype)
  b, L, d = s.b, s.L, s.d
  x = rnd(b, L, d)
  cases = []

  # ---- Mamba-1
  m1 = MambaMixer(d_model=d, dtype=BF16, param_dtype=F32, **s.m1)
  p1 = _init(m1, x)["params"]
  di, n, rank = m1.d_inner, m1.d_state, m1.rank
  xs, z = rnd(b, L, di), rnd(b, L, di)
  conv = CausalDepthwiseConv1d(m1.d_conv, BF16, F32)
  pad = lambda t, k: jnp.pad(t, ((0, 0), (k - 1, 0), (0, 0)))

  def conv_silu(xs, kernel, bias):
    return jax.nn.silu(conv.apply({"params": {"kernel": kernel, "bias": bias}}, pad(xs, m1.d_conv)))

  def x_dt_proj(xs, w_x, w_dt):
    dt_low, B, C = jnp.split(dense(xs, w_x), [rank, rank + n], axis=-1)
    return dense(dt_low, w_dt), B, C

  def scan(u, delta, A_log, B, C, D, z, dt_bias):
    return ops.selective_scan(u, delta, -jnp.exp(A_log), B, C, D=D, z=z, delta_bias=dt_bias,
                              delta_softplus=True)

  cases += [
      ("mamba1", "in_proj", dense, (x, p1["in_proj"]["kernel"]), False),
      ("mamba1", "conv+silu", conv_silu, (xs, p1["conv1d"]["kernel"], p1["conv1d"]["bias"]), False),
      ("mamba1", "conv+silu [grouped]", conv_silu,
       (xs, p1["conv1d"]["kernel"], p1["conv1d"]["bias"]), True),
      ("mamba1", "conv+silu [custom vjp]",
       lambda xs, k, c: conv_silu_vjp(pad(xs, m1.d_conv), k.astype(BF16), c.astype(BF16), BF16),
       (xs, p1["conv1d"]["kernel"], p1["conv1d"]["bias"]), False),
      ("mamba1", "x_proj+dt_proj", x_dt_proj,
       (xs, p1["x_proj"]["kernel"], p1["dt_proj_kernel"]), False),
      ("mamba1", "selective_scan", scan,
       (xs, rnd(b, L, di, scale=0.5), p1["A_log"], rnd(b, L, n), rnd(b, L, n), p1["D"], z,
        p1["dt_bias"]), False),
      ("mamba1", "out_proj", dense, (xs, p1["out_proj"]["kernel"]), False),
      ("mamba1", "layer", lambda p, x: m1.apply({"params": p}, x), (p1, x), False),
      ("mamba1", "layer [grouped conv]", lambda p, x: m1.apply({"params": p}, x), (p1, x), True),
  ]

  # ---- Mamba-2
  m2 = Mamba2Mixer(d_model=d, dtype=BF16, param_dtype=F32, **s.m2)
  p2 = _init(m2, x)["params"]
  h, hd, n2 = m2.heads, m2.head_dim, m2.d_state
  conv_dim = m2.d_inner + 2 * m2.n_groups * n2
  norm2 = GatedRMSNorm(m2.n_groups, m2.norm_eps, BF16, F32)

  def ssd(xh, dt, A_log, B, C, D, dt_bias):
    return ops.ssd(xh, dt, -jnp.exp(A_log), B, C, D=D, dt_bias=dt_bias, dt_softplus=True,
                   chunk_size=m2.chunk_size)

  xbc = rnd(b, L, conv_dim)
  cases += [
      ("mamba2", "in_proj", dense, (x, p2["in_proj"]["kernel"]), False),
      ("mamba2", "conv+silu", conv_silu, (xbc, p2["conv1d"]["kernel"], p2["conv1d"]["bias"]), False),
      ("mamba2", "conv+silu [grouped]", conv_silu,
       (xbc, p2["conv1d"]["kernel"], p2["conv1d"]["bias"]), True),
      ("mamba2", "ssd", ssd,
       (rnd(b, L, h, hd), rnd(b, L, h, scale=0.5), p2["A_log"], rnd(b, L, 1, n2), rnd(b, L, 1, n2),
        p2["D"], p2["dt_bias"]), False),
      ("mamba2", "gated_norm", lambda sc, y, z: norm2.apply({"params": {"scale": sc}}, y, z),
       (p2["norm"]["scale"], rnd(b, L, m2.d_inner), rnd(b, L, m2.d_inner)), False),
      ("mamba2", "gated_norm [custom vjp]",
       lambda sc, y, z: gated_norm_vjp(sc, y, z, m2.n_groups, m2.norm_eps, BF16),
       (p2["norm"]["scale"], rnd(b, L, m2.d_inner), rnd(b, L, m2.d_inner)), False),
      ("mamba2", "out_proj", dense, (rnd(b, L, m2.d_inner), p2["out_proj"]["kernel"]), False),
      ("mamba2", "layer", lambda p, x: m2.apply({"params": p}, x), (p2, x), False),
      ("mamba2", "layer [grouped conv]", lambda p, x: m2.apply({"params": p}, x), (p2, x), True),
  ]

  # ---- attention + MLP (the Transformer's block) and the pre-norm
  att = CausalSelfAttention(s.heads, s.heads, s.head_dim, dtype=BF16, param_dtype=F32)
  pa = _init(att, x)["params"]
  q, k, v = (rnd(b, L, s.heads, s.head_dim) for _ in range(3))
  pos = jnp.broadcast_to(jnp.arange(L), (b, L))

  def qkv(x, wq, wk, wv):
    return dense(x, wq), dense(x, wk), dense(x, wv)

  def rope(q, k, pos):
    return apply_rope(q, pos, att.rope_theta), apply_rope(k, pos, att.rope_theta)

  mlp = SwiGLU(default_d_ff(d), BF16, F32)
  pm = _init(mlp, x)["params"]
  norm = RMSNorm(dtype=BF16, param_dtype=F32)
  cases += [
      ("attn", "qkv_proj", qkv,
       (x, pa["q_proj"]["kernel"], pa["k_proj"]["kernel"], pa["v_proj"]["kernel"]), False),
      ("attn", "rope", rope, (q, k, pos), False),
      ("attn", "attention", lambda q, k, v: ops.attention(q, k, v, causal=True), (q, k, v), False),
      ("attn", "o_proj", lambda o, w: jnp.einsum("blhd,hde->ble", o, w.astype(o.dtype)),
       (q, pa["o_proj"]["kernel"]), False),
      ("attn", "layer", lambda p, x: att.apply({"params": p}, x), (pa, x), False),
      ("mlp", "layer", lambda p, x: mlp.apply({"params": p}, x), (pm, x), False),
      ("norm", "layer", lambda sc, x: norm.apply({"params": {"scale": sc}}, x),
       (jnp.ones((d,), F32), x), False),
  ]
  return cases


def _is_float(a) -> bool:
  return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def programs(fn: Callable, args: tuple):
  """(fwd(*args), fwdbwd(args, ct)) where fwdbwd returns (out, grads of <out, ct> w.r.t. the float
  leaves of args; integer leaves such as positions are held fixed)."""
  flat, tree = jax.tree.flatten(args)
  is_f = [_is_float(a) for a in flat]

  def fwdbwd(args, ct):
    flat = jax.tree.leaves(args)
    floats = [a for a, f in zip(flat, is_f, strict=True) if f]

    def g(*floats):
      it = iter(floats)
      full = [next(it) if f else a for a, f in zip(flat, is_f, strict=True)]
      return fn(*jax.tree.unflatten(tree, full))
    out, vjp = jax.vjp(g, *floats)
    return out, vjp(ct)
  return (lambda *a: fn(*a)), fwdbwd


def cotangent(fn, args, key):
  shapes = jax.eval_shape(fn, *args)
  leaves, tree = jax.tree.flatten(shapes)
  ks = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, s.shape, F32).astype(s.dtype)
                                   for k, s in zip(ks, leaves, strict=True)])


def cost(exe) -> dict[str, float]:
  try:
    ca = exe.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}
  except Exception:  # noqa: BLE001  (cost analysis is optional on some backends)
    return {"flops": float("nan"), "bytes": float("nan")}


def time_exe(exe, args, reps: int, target_s: float = 0.02) -> tuple[float, float, int]:
  """(median ms, min ms, calls per repeat): each repeat issues `calls` back-to-back calls and waits
  for the last; calls is chosen from a warm call so a repeat lasts ~target_s."""
  for _ in range(2):
    jax.block_until_ready(exe(*args))
  t = time.perf_counter()
  jax.block_until_ready(exe(*args))
  one = time.perf_counter() - t
  calls = int(min(200, max(1, round(target_s / max(one, 1e-6)))))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(calls):
      out = exe(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) * 1e3 / calls)
  return statistics.median(times), min(times), calls


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", required=True)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps (any backend)")
  ap.add_argument("--batch", type=int, default=8, help="batch of every case (default 8)")
  ap.add_argument("--length", type=int, default=2048)
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--groups", default="mamba1,mamba2,attn,mlp,norm",
                  help="comma-separated subset of mamba1,mamba2,attn,mlp,norm")
  ap.add_argument("--budget_s", type=float, default=220.0,
                  help="no compile starts after 0.6 of it, no timed row after it (recorded)")
  ap.add_argument("--workers", type=int, default=12, help="parallel compiles")
  ap.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse)")
  opts = ap.parse_args()
  t_start = time.time()
  out_dir = pathlib.Path(opts.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  dev = jax.devices()[0]
  global HBM_TBS, MATMUL_TFS
  ceil = ceilings.for_device(getattr(dev, "device_kind", str(dev)))
  HBM_TBS, MATMUL_TFS = ceil.hbm_tb_s, ceil.matmul_tf_s
  meta = dict(device=getattr(dev, "device_kind", str(dev)), backend=jax.default_backend(),
              jax=jax.__version__, date=str(datetime.date.today()), commit=git_commit(opts.commit),
              ceilings_source=ceil.source, ceilings=dict(hbm_tb_s=HBM_TBS, bf16_matmul_tf_s=MATMUL_TFS), smoke=opts.smoke)
  s = Shapes(opts.smoke, opts.batch, opts.length)
  meta["shape"] = dict(batch=s.b, length=s.L, d_model=s.d)
  reps = 2 if opts.smoke else opts.reps
  print(meta, flush=True)
  rows, checks = [], []

  def save():
    meta["elapsed_s"] = round(time.time() - t_start, 1)
    (out_dir / "layer_breakdown.json").write_text(
        json.dumps(dict(meta=meta, checks=checks, rows=rows), indent=1))
    md = render_md(meta, checks, rows)
    (out_dir / "layer_breakdown.md").write_text(md)
    return md

  groups = set(opts.groups.split(","))
  cases = [c for c in build_cases(s) if c[0] in groups]
  cts = {}
  # Programs are lowered in this thread (tracing is Python; the grouped-conv rows swap a module
  # global while they trace) and each is handed to the compile pool as soon as it is lowered, the
  # grouped-conv programs first (XLA may spend long on their batch-grouped kernel gradient). Rows are
  # timed once every compile is done or at 0.6 of the budget, the grouped ones last; a compile still
  # running when its row comes is waited for until the budget ends, so one slow compile cannot hold
  # the other rows back.
  deadline = t_start + 0.6 * opts.budget_s
  t_comp = time.time()

  def comp(key, low):
    if isinstance(low, Exception) or time.time() > deadline:
      return low if isinstance(low, Exception) else None, 0.0
    t = time.time()
    try:
      exe = low.compile()
    except Exception as e:  # noqa: BLE001
      exe = e
    secs = time.time() - t
    status = ("ok" if not isinstance(exe, Exception)
              else f"FAILED {type(exe).__name__}: {exe}"[:300])
    print(f"  compile {key}: {secs:.1f}s {status} (t={time.time() - t_comp:.0f}s)", flush=True)
    return exe, secs

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=opts.workers)
  futures = {}
  for i, (group, part, fn, args, grouped) in sorted(enumerate(cases), key=lambda ic: not ic[1][4]):
    name = f"{group}/{part}"
    fwd, fb = programs(fn, args)
    try:
      with grouped_conv_in_layers() if grouped else contextlib.nullcontext():
        cts[name] = cotangent(fn, args, jax.random.PRNGKey(100 + i))
        low = {"fwd": jax.jit(fwd).lower(*args), "fwdbwd": jax.jit(fb).lower(args, cts[name])}
    except Exception as e:  # noqa: BLE001  (one bad case must not lose the others)
      traceback.print_exc()
      low = {"fwd": e, "fwdbwd": e}
    for mode, lw in low.items():
      futures[f"{name}/{mode}"] = pool.submit(comp, f"{name}/{mode}", lw)
  print(f"lowered {len(futures)} programs in {time.time() - t_start:.1f}s", flush=True)
  concurrent.futures.wait(futures.values(), timeout=max(0.0, deadline - time.time()))
  meta["compile_s"] = round(time.time() - t_start, 1)
  save()

  def get_exe(key):
    try:
      return futures[key].result(timeout=max(0.0, t_start + opts.budget_s - time.time()))[0]
    except concurrent.futures.TimeoutError:
      return RuntimeError("compile still running at the end of the budget")

  exes = {}
  for i, (group, part, _fn, args, _grouped) in sorted(enumerate(cases), key=lambda ic: ic[1][4]):
    name = f"{group}/{part}"
    row = dict(group=group, part=part, order=i)
    for mode in ("fwd", "fwdbwd"):
      exe = exes[f"{name}/{mode}"] = get_exe(f"{name}/{mode}")
      try:
        if time.time() - t_start > opts.budget_s:
          raise RuntimeError("skipped: time budget")
        if exe is None or isinstance(exe, Exception):
          raise RuntimeError(f"not compiled: {exe!r}"[:300])
        call_args = args if mode == "fwd" else (args, cts[name])
        ms, ms_min, calls = time_exe(exe, call_args, reps)
        c = cost(exe)
        roof = max(c["flops"] / (MATMUL_TFS * 1e12), c["bytes"] / (HBM_TBS * 1e12)) * 1e3
        row.update({f"{mode}_ms": ms, f"{mode}_min_ms": ms_min, f"{mode}_calls": calls,
                    f"{mode}_xla_gflop": c["flops"] / 1e9, f"{mode}_xla_mb": c["bytes"] / 1e6,
                    f"{mode}_roofline_ms": roof})
      except Exception as e:  # noqa: BLE001
        if "skipped" not in str(e):
          traceback.print_exc()
        row[f"{mode}_error"] = repr(e)[:300]
    rows.append(row)
    print(row, flush=True)
    save()

  # Formulations of one part at full size: outputs and every gradient (bf16 compute).
  pairs = [(f"{g}/{p}", f"{g}/{p} {alt}") for g in ("mamba1", "mamba2")
           for p, alt in (("conv+silu", "[grouped]"), ("layer", "[grouped conv]"))]
  pairs += [("mamba1/conv+silu [custom vjp]", "mamba1/conv+silu"),
            ("mamba2/gated_norm [custom vjp]", "mamba2/gated_norm")]
  for new, old in pairs:
    e_new, e_old = exes.get(new + "/fwdbwd"), exes.get(old + "/fwdbwd")
    if not all(e is not None and not isinstance(e, Exception) for e in (e_new, e_old)):
      continue
    if time.time() - t_start > opts.budget_s + 20:
      break
    try:
      args = next(c[3] for c in cases if f"{c[0]}/{c[1]}" == new)
      got, ref = e_new(args, cts[new]), e_old(args, cts[new])
      errs = [rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)]
      checks.append(dict(case=f"{new} vs {old}", max_rel_err=max(errs),
                         per_leaf=[round(e, 5) for e in errs]))
    except Exception as e:  # noqa: BLE001
      checks.append(dict(case=f"{new} vs {old}", error=repr(e)[:300]))
    print(checks[-1], flush=True)
    save()
  print(save(), flush=True)
  pool.shutdown(wait=False, cancel_futures=True)
  if not all(f.done() for f in futures.values()):
    os._exit(0)   # a compile thread is still busy: do not wait for it (everything is saved)


def render_md(meta, checks, rows) -> str:
  sh = meta["shape"]
  lines = [f"# Layer breakdown ({meta['device']}, {meta['date']}, commit {meta['commit']}, "
           f"jax {meta['jax']})", "",
           f"batch {sh['batch']}, length {sh['length']}, d_model {sh['d_model']}; bf16 compute, "
           "float32 parameters. Median ms after warm-up; fwd+bwd = forward + VJP w.r.t. every "
           "float input (parameters too). XLA GFLOP / MB: the compiled program's cost analysis; "
           f"roofline = max(GFLOP / {MATMUL_TFS} TF/s, MB / {HBM_TBS} TB/s); frac = roofline / "
           "measured. [grouped]: the depthwise conv as lax's grouped convolution (before); "
           "[custom vjp]: candidate hand-written backward passes (not in the layers).", "",
           f"Compiles done at {meta.get('compile_s', '?')} s; elapsed {meta.get('elapsed_s')} s.",
           "",
           "| group | part | fwd ms | fwd+bwd ms | fwd+bwd XLA GFLOP | fwd+bwd XLA MB | "
           "roofline ms | frac |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
  for r in sorted(rows, key=lambda r: r["order"]):
    ms, roof = r.get("fwdbwd_ms"), r.get("fwdbwd_roofline_ms")
    frac = roof / ms if ms and roof == roof and roof is not None else None
    err = "; ".join(r[k] for k in ("fwd_error", "fwdbwd_error") if k in r)
    lines.append(f"| {r['group']} | {r['part']} | {f(r.get('fwd_ms'))} | {f(ms)} | "
                 f"{f(r.get('fwdbwd_xla_gflop'), 1)} | {f(r.get('fwdbwd_xla_mb'), 0)} | "
                 f"{f(roof)} | {f(frac, 2)} |" + (f" {err[:120]}" if err else ""))
  lines += ["", "## Formulations agree (fwd+bwd outputs and gradients, bf16; relative Frobenius "
            "error)", ""]
  lines += [f"- {c['case']}: " + (f"max {c['max_rel_err']:.2e} over {len(c['per_leaf'])} arrays"
                                  if "max_rel_err" in c else c.get("error", "?")) for c in checks]
  by = {(r["group"], r["part"]): r.get("fwdbwd_ms") for r in rows}
  now = {k: by.get((k, "layer")) for k in ("mamba1", "mamba2", "attn", "mlp", "norm")}
  before = dict(now, mamba1=by.get(("mamba1", "layer [grouped conv]")),
                mamba2=by.get(("mamba2", "layer [grouped conv]")))
  lines += ["", "## Projection to the 350M models (layers x per-layer fwd+bwd, scaled to the "
            "model's batch; embedding, LM head, loss and optimizer not included)", "",
            "| model | batch | layers ms (now) | layers ms (grouped conv, before) | "
            "measured step ms (train_throughput, before) |",
            "| --- | ---: | ---: | ---: | ---: |"]

  def project(per_layer, counts, batch):
    if any(per_layer.get(k) is None for k in counts):
      return "-"
    return f"{sum(n * per_layer[k] for k, n in counts.items()) * batch / sh['batch']:.0f}"
  for model, (counts, batch, step_ms) in MODELS.items():
    if not meta.get("smoke"):
      lines.append(f"| {model} | {batch} | {project(now, counts, batch)} | "
                   f"{project(before, counts, batch)} | {step_ms:.0f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
