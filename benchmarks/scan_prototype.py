"""Design experiment for issue 4: a selective-scan forward and backward that keep each channel's
d_state states inside one thread. This is NOT `selective_scan(impl="pallas")`; nothing imports it.

The v4 kernels spread a channel's states over lanes. The sums over states (y = C.h, and in the
backward sum_n g B and sum_n g A w) and the sums over channels (dB, dC) then become shuffle trees,
and on the H200 40-45% of v4's instructions are SHFL and their FADDs (Nsight Compute, NOTES_selective_scan.md).
Here a program owns `block_d` channels, one per lane, and the [d_state, block_d] state tile has
all of a channel's states in its lane. The sums over states stay in-thread; only dB and dC (sums
over channels) cross lanes, once a token. v3 (`Config(variant="v3")`) has the same layout. This
prototype differs in its checkpoint interval and recompute, in taking one exponential per element
and token, and in the missing pieces below (benchmarks/NOTES_selective_scan.md).

Bare on purpose. There is no z gate, D skip, softplus, delta_bias, initial or final state,
time segments, padding or groups. d_state is 16, and the sizes must divide evenly. dB and dC come
out per channel block and are summed here in XLA. The exponentials use ex2.approx through inline
asm (jnp.exp compiles to the accurate expf sequence, several times the instructions).
- Forward: the recurrence a token at a time; it stores the state at the start of every chunk of T
  tokens (float32).
- Backward: chunks in reverse. Per chunk it recomputes the states at every U tokens from the chunk's
  checkpoint. Per sub-chunk of U tokens it recomputes and keeps the U states and decays, then runs
  the adjoint g_t = dy_t C_t + a_{t+1} g_{t+1} backwards over them, with
  d delta_t = sum_n g (A w + u B),  du_t = delta_t sum_n g B,  dA += g w delta,
  dB_t = sum_d g delta u,  dC_t = sum_d h dy,  where w = a_t h_{t-1}.

What it measures: the time of these two kernels at the issue's first shape, against the full op
(v4) and jax-linear-attention in the same run. If they are far below v4's time, the design is worth
finishing (segments, z, D, softplus, groups, padding), knowing the missing parts add some time.

  python -m benchmarks.scan_prototype --check        # interpret mode, small shape, vs lax.scan
  python -m benchmarks.scan_prototype --out DIR      # on a GPU: timings (JSON + markdown)
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


from ssm_lab import timing  # noqa: E402
import ssm_lab.ops.pallas.selective_scan as PSS  # noqa: E402
from ssm_lab.ops.pallas.selective_scan import LOG2E, recompute_sub_chunks  # noqa: E402

_ex2 = PSS._ex2

F32 = jnp.float32


def _fma(a, b, c, interpret, fma):
  """a * b + c: one inline-asm FFMA with `fma` on the GPU (the op's `_fma`), else a product and a sum."""
  return PSS._fma(a, b, c, interpret or not fma)


def _fwd_kernel(u_ref, dt_ref, at_ref, b_ref, c_ref, y_ref, ck_ref, *, T, interpret, fma=False):
  a2 = at_ref[...] * LOG2E                                  # [N, BD]: A transposed, channels last
  L = u_ref.shape[0]

  def chunk(ci, h):
    ck_ref[ci] = h
    for i in range(T):
      t = ci * T + i
      u, dt = u_ref[t, :].astype(F32), dt_ref[t, :].astype(F32)
      bt, ct = b_ref[t, :].astype(F32), c_ref[t, :].astype(F32)
      h = _fma(_ex2(dt[None, :] * a2, interpret), h, (dt * u)[None, :] * bt[:, None], interpret, fma)
      y_ref[t, :] = jnp.sum(h * ct[:, None], axis=0).astype(y_ref.dtype)
    return h

  jax.lax.fori_loop(0, L // T, chunk, jnp.zeros(a2.shape, F32))


def _bwd_kernel(u_ref, dt_ref, at_ref, b_ref, c_ref, dy_ref, ck_ref, du_ref, ddt_ref, da_ref,
                db_ref, dc_ref, *, T, U, interpret, fma=False):
  a2 = at_ref[...] * LOG2E
  L = u_ref.shape[0]

  def tok(t):
    return (u_ref[t, :].astype(F32), dt_ref[t, :].astype(F32), b_ref[t, :].astype(F32),
            c_ref[t, :].astype(F32), dy_ref[t, :].astype(F32))

  def step(h, t):
    u, dt, bt, _, _ = tok(t)
    a = _ex2(dt[None, :] * a2, interpret)
    return a, _fma(a, h, (dt * u)[None, :] * bt[:, None], interpret, fma)

  def chunk(kk, carry):
    g, da = carry                                           # g: a_{t+1} g_{t+1} from later tokens
    ci = L // T - 1 - kk
    t0 = ci * T
    for j, hs, decays in recompute_sub_chunks(step, ck_ref[ci], t0, T, U):
      for i in reversed(range(U)):
        t = t0 + j * U + i
        u, dt, bt, ct, dy = tok(t)
        g = _fma(ct[:, None], dy[None, :], g, interpret, fma)  # dL/dh_t
        w = decays[i] * hs[i]                               # a_t h_{t-1}
        da = _fma(g * w, dt[None, :], da, interpret, fma)
        gb = jnp.sum(g * bt[:, None], axis=0)
        ddt_ref[t, :] = jnp.sum(g * w * a2, axis=0) * (1.0 / LOG2E) + gb * u
        du_ref[t, :] = (dt * gb).astype(du_ref.dtype)
        db_ref[t, :] = jnp.sum(g * (dt * u)[None, :], axis=1)
        dc_ref[t, :] = jnp.sum(hs[i + 1] * dy[None, :], axis=1)
        g = decays[i] * g
    return g, da

  _, da = jax.lax.fori_loop(0, L // T, chunk, (jnp.zeros(a2.shape, F32),) * 2)
  da_ref[...] = da


def prototype(block_d=32, num_warps=1, T=16, U=4, interpret=False, fma=False):
  """(fwd(u, dt, A, B, C) -> (y, checkpoints), bwd(u, dt, A, B, C, dy, checkpoints) -> grads).
  u, dt, dy [b, L, D] bf16; A [D, N] float32; B, C [b, L, N] bf16."""
  params = plt.CompilerParams(num_warps=num_warps, num_stages=1)

  def fwd(u, dt, A, B, C):
    b, L, D = u.shape
    N = A.shape[1]
    ld = pl.BlockSpec((None, L, block_d), lambda bi, i: (bi, 0, i))
    ln = pl.BlockSpec((None, L, N), lambda bi, i: (bi, 0, 0))
    return pl.pallas_call(
        lambda *r: _fwd_kernel(*r, T=T, interpret=interpret, fma=fma),
        out_shape=(jax.ShapeDtypeStruct((b, L, D), u.dtype),
                   jax.ShapeDtypeStruct((b, L // T, N, D), F32)),
        grid=(b, D // block_d),
        in_specs=[ld, ld, pl.BlockSpec((N, block_d), lambda bi, i: (0, i)), ln, ln],
        out_specs=[ld, pl.BlockSpec((None, L // T, N, block_d), lambda bi, i: (bi, 0, 0, i))],
        compiler_params=params, interpret=interpret, name="proto_scan_fwd",
    )(u, dt, A.T, B, C)

  def bwd(u, dt, A, B, C, dy, ck):
    b, L, D = u.shape
    N = A.shape[1]
    nb = D // block_d
    ld = pl.BlockSpec((None, L, block_d), lambda bi, i: (bi, 0, i))
    ln = pl.BlockSpec((None, L, N), lambda bi, i: (bi, 0, 0))
    part = pl.BlockSpec((None, None, L, N), lambda bi, i: (bi, i, 0, 0))
    du, ddt, da, db, dc = pl.pallas_call(
        lambda *r: _bwd_kernel(*r, T=T, U=U, interpret=interpret, fma=fma),
        out_shape=(jax.ShapeDtypeStruct((b, L, D), u.dtype), jax.ShapeDtypeStruct((b, L, D), F32),
                   jax.ShapeDtypeStruct((b, N, D), F32), jax.ShapeDtypeStruct((b, nb, L, N), F32),
                   jax.ShapeDtypeStruct((b, nb, L, N), F32)),
        grid=(b, D // block_d),
        in_specs=[ld, ld, pl.BlockSpec((N, block_d), lambda bi, i: (0, i)), ln, ln, ld,
                  pl.BlockSpec((None, L // T, N, block_d), lambda bi, i: (bi, 0, 0, i))],
        out_specs=[ld, ld, pl.BlockSpec((None, N, block_d), lambda bi, i: (bi, 0, i)), part, part],
        compiler_params=params, interpret=interpret, name="proto_scan_bwd",
    )(u, dt, A.T, B, C, dy, ck)
    return du, ddt, da.sum(0).T, db.sum(1), dc.sum(1)

  return fwd, bwd


def reference(u, dt, A, B, C):
  """y of the bare recurrence, token by token in float32 (the oracle)."""
  u, dt, B, C = (x.astype(F32) for x in (u, dt, B, C))

  def one(h, xs):
    ut, dtt, bt, ct = xs                                    # [b, D], [b, D], [b, N], [b, N]
    h = jnp.exp(dtt[..., None] * A) * h + (dtt * ut)[..., None] * bt[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, ct)

  h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), F32)
  xs = tuple(jnp.swapaxes(x, 0, 1) for x in (u, dt, B, C))
  return jnp.swapaxes(jax.lax.scan(one, h0, xs)[1], 0, 1)


def inputs(key, b, L, D, N):
  ks = jax.random.split(key, 6)
  u = jax.random.normal(ks[0], (b, L, D)).astype(jnp.bfloat16)
  dt = jnp.exp(jax.random.uniform(ks[1], (b, L, D), minval=jnp.log(1e-3), maxval=jnp.log(1e-1)))
  A = -jnp.exp(jax.random.uniform(ks[2], (D, N), minval=0.0, maxval=jnp.log(16.0)))
  B = jax.random.normal(ks[3], (b, L, N)).astype(jnp.bfloat16)
  C = jax.random.normal(ks[4], (b, L, N)).astype(jnp.bfloat16)
  dy = jax.random.normal(ks[5], (b, L, D)).astype(jnp.bfloat16)
  return u, dt.astype(jnp.bfloat16), A, B, C, dy


def check(shape, interpret, **kw):
  """Max relative error of y and every gradient against the float32 reference's."""
  b, L, D, N = shape
  u, dt, A, B, C, dy = inputs(jax.random.PRNGKey(0), b, L, D, N)
  fwd, bwd = prototype(interpret=interpret, **kw)
  y, ck = jax.jit(fwd)(u, dt, A, B, C)
  grads = jax.jit(bwd)(u, dt, A, B, C, dy, ck)
  f32 = lambda x: x.astype(F32)
  y_ref, vjp = jax.vjp(reference, f32(u), f32(dt), A, f32(B), f32(C))
  refs = vjp(f32(dy))
  rel = lambda a, r: float(jnp.linalg.norm(f32(a) - r) / jnp.linalg.norm(r))
  out = {"y": rel(y, y_ref)}
  out.update({k: rel(g, r) for k, g, r in zip(("du", "ddelta", "dA", "dB", "dC"), grads, refs)})
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--check", action="store_true", help="small shape against the reference only")
  ap.add_argument("--out", default=None)
  ap.add_argument("--commit", default="unknown")
  ap.add_argument("--reps", type=int, default=20)
  opts = ap.parse_args()
  interpret = jax.default_backend() != "gpu"
  if opts.check:
    print(json.dumps(check((2, 64, 64, 16), interpret, T=16, U=4, block_d=32)))
    return
  from ssm_lab.ops import selective_scan             # noqa: PLC0415 (the full op, v4 on a GPU)
  b, L, D, N = 8, 2048, 1536, 16
  rows = {"check (2, 512, 256, 16) vs float32 reference": check((2, 512, 256, 16), interpret),
          "check fma U2 T8": check((2, 512, 256, 16), interpret, T=8, U=2, fma=True)}
  u, dt, A, B, C, dy = inputs(jax.random.PRNGKey(1), b, L, D, N)
  res = {}
  # "K pieces": the sequence cut into K independent pieces ([b, L] -> [b K, L / K]), as time segments
  # would run, but WITHOUT the hand-over between them (the values differ from the op's): the time
  # of the two kernels once there are enough programs, not counting segment passes.
  # Measured 2026-12-04 (H200; NOTES_selective_scan.md): one piece, T16 and T8; 4 and 8 pieces.
  # Not yet timed: fma (inline-asm FFMA) and U = 2, which offline SASS gives 16.2 warp-instructions
  # a token-channel and 24 B of spill at T = 8 (17.6 and 368 B without).
  for name, kw, pieces in (("T16 U4 block_d 32 w1", {}, 1),
                           ("T8 U4 block_d 32 w1", dict(T=8), 1),
                           ("T16 U4 block_d 32 w1, 8 pieces", {}, 8),
                           ("T8 U4 block_d 32 w1, 8 pieces", dict(T=8), 8),
                           ("T8 U2 fma block_d 32 w1, 8 pieces", dict(T=8, U=2, fma=True), 8),
                           ("T8 U2 fma block_d 32 w1, 16 pieces", dict(T=8, U=2, fma=True), 16)):
    fwd, bwd = prototype(interpret=interpret, **kw)
    cut = lambda x: x.reshape(x.shape[0] * pieces, x.shape[1] // pieces, *x.shape[2:])
    a = (cut(u), cut(dt), A, cut(B), cut(C))
    fe = jax.jit(fwd).lower(*a).compile()
    y, ck = fe(*a)
    be = jax.jit(bwd).lower(*a, cut(dy), ck).compile()
    ab = (*a, cut(dy), ck)
    res[name] = {"fwd_ms": timing.synchronised(fe, a, opts.reps)[0],
                 "fwd_pipelined_ms": timing.pipelined(fe, a, opts.reps),
                 "bwd_ms": timing.synchronised(be, ab, opts.reps)[0],
                 "bwd_pipelined_ms": timing.pipelined(be, ab, opts.reps)}
    print(name, res[name], flush=True)

  def full(impl):
    def loss(u, dt, A, B, C):
      if impl == "jla":
        import jla.ops  # noqa: PLC0415 (jax-linear-attention 0.1.0, carried as a wheel)
        return jla.ops.linear_attention("mamba1", q=C, k=B, v=u, dt=dt, a=A, d=None, z=None,
                                        dt_bias=None, dt_softplus=False, initial_state=None,
                                        output_final_state=False, impl="mosaic_gpu")[0]
      return selective_scan(u, dt, A, B, C, impl=impl)

    def fb(u, dt, A, B, C, dy):
      y, vjp = jax.vjp(loss, u, dt, A, B, C)
      return y, vjp(dy)
    return jax.jit(fb).lower(u, dt, A, B, C, dy).compile()

  for impl in ("pallas", "associative", "jla"):
    try:
      exe = full(impl)
    except Exception as e:  # noqa: BLE001 (jla missing or failing must not cost the other rows)
      res[f"full op {impl}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(impl, res[f"full op {impl}"], flush=True)
      continue
    res[f"full op {impl} (fwd+bwd, bare arguments)"] = {
        "fwdbwd_ms": timing.synchronised(exe, (u, dt, A, B, C, dy), opts.reps)[0],
        "fwdbwd_pipelined_ms": timing.pipelined(exe, (u, dt, A, B, C, dy), opts.reps)}
    print(impl, res[f"full op {impl} (fwd+bwd, bare arguments)"], flush=True)
  meta = dict(device=jax.devices()[0].device_kind, date=datetime.date.today().isoformat(),
              commit=opts.commit, shape=[b, L, D, N], jax=jax.__version__)
  if opts.out:
    out = pathlib.Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scan_prototype.json").write_text(json.dumps(dict(meta=meta, checks=rows, results=res),
                                                        indent=1))
    lines = [f"# Scan prototype: states in-thread ({meta['device']}, {meta['date']}, commit "
             f"{meta['commit']})", "", f"Shape (b, L, d_inner, d_state) = {tuple(meta['shape'])}, "
             "bf16 inputs. Bare kernels (no z, D, softplus, bias, segments); see the script's "
             "docstring.", "", "| row | ms (synchronised) | ms (pipelined) |", "| --- | ---: | ---: |"]
    for name, r in res.items():
      for k in ("fwd", "bwd", "fwdbwd"):
        if f"{k}_ms" in r:
          lines.append(f"| {name} {k} | {r[f'{k}_ms']:.3f} | {r[f'{k}_pipelined_ms']:.3f} |")
    lines += ["", "Checks (max relative error vs the float32 reference): " + json.dumps(rows)]
    (out / "scan_prototype.md").write_text("\n".join(lines) + "\n")
  print(json.dumps(dict(meta=meta, checks=rows, results=res), indent=1))


if __name__ == "__main__":
  main()
