"""`python -m ssm_lab.ops info`: the backend, its devices, and the impl `impl="auto"` picks per op.

The picks are made by each op's registry for a typical training call of a ~130M model (batch 8 x 2048
tokens, bf16), described by shapes only: nothing is computed, so this runs in a second on any machine
and says what a model would run there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp

from ssm_lab import ops

# The modules, not the functions of the same names that `ssm_lab.ops` re-exports.
scan_mod = importlib.import_module("ssm_lab.ops.selective_scan")
ssd_mod = importlib.import_module("ssm_lab.ops.ssd")
attention_mod = importlib.import_module("ssm_lab.ops.attention")

BF16, F32 = jnp.bfloat16, jnp.float32


def _s(shape: tuple[int, ...], dtype=BF16) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


def typical_calls() -> dict[str, tuple[str, Any, dict[str, Any]]]:
  """op -> (shape in words, its registry, the call's keyword arguments as shapes)."""
  b, L = 8, 2048
  d, n = 1536, 16                                   # Mamba-130M: d_inner 1536, d_state 16
  h, p, n2 = 24, 64, 128                            # Mamba-2-130M: 24 heads of 64, d_state 128
  qh, hd = 12, 64                                   # Transformer ~125M: 12 heads of 64
  return {
      "selective_scan": (
          f"u [{b}, {L}, {d}], d_state {n}, bf16", scan_mod.REGISTRY,
          dict(u=_s((b, L, d)), delta=_s((b, L, d)), A=_s((d, n), F32), B=_s((b, L, 1, n)),
               C=_s((b, L, 1, n)), D=_s((d,), F32), z=_s((b, L, d)), delta_bias=_s((d,), F32),
               delta_softplus=True, initial_state=None, return_final_state=False)),
      "ssd": (
          f"x [{b}, {L}, {h}, {p}], d_state {n2}, bf16", ssd_mod.REGISTRY,
          dict(x=_s((b, L, h, p)), dt=_s((b, L, h)), A=_s((h,), F32), B=_s((b, L, 1, n2)),
               C=_s((b, L, 1, n2)), D=_s((h,), F32), dt_bias=_s((h,), F32), dt_softplus=True,
               chunk_size=None, initial_state=None, return_final_state=False)),
      "attention": (
          f"q, k, v [{b}, {L}, {qh}, {hd}], causal, bf16", attention_mod.REGISTRY,
          dict(q=_s((b, L, qh, hd)), k=_s((b, L, qh, hd)), v=_s((b, L, qh, hd)), causal=True,
               sliding_window=None, segment_ids=None, scale=hd ** -0.5)),
  }


def info() -> dict[str, Any]:
  """The backend, its devices and, per op, the auto pick (or why there is none) and the order tried."""
  backend = jax.default_backend()
  out: dict[str, Any] = dict(
      jax=jax.__version__, backend=backend,
      devices=[f"{dv.platform}:{dv.id} {dv.device_kind}" for dv in jax.devices()], ops={})
  for op, (shape, registry, call) in typical_calls().items():
    try:
      pick = registry.resolve("auto", backend=backend, **call).name
    except ValueError as e:
      pick = f"none ({e})"
    out["ops"][op] = dict(shape=shape, auto=pick, order=registry.auto_order(backend),
                          registered=list(registry.names))
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m ssm_lab.ops", description=__doc__.splitlines()[0])
  ap.add_argument("command", choices=["info"])
  ap.add_argument("--json", action="store_true", help="print the report as JSON")
  args = ap.parse_args(argv)
  assert args.command == "info"
  rep = info()
  if args.json:
    print(json.dumps(rep, indent=1))
    return 0
  print(f"jax {rep['jax']}, backend {rep['backend']}")
  for dv in rep["devices"]:
    print(f"  device {dv}")
  for op, r in rep["ops"].items():
    print(f"{op:15s} auto -> {r['auto']}   at {r['shape']}   (tries {', '.join(r['order'])}; "
          f"registered: {', '.join(r['registered'])})")
  return 0


del ops  # imported for its side effect: every impl, the Pallas kernels included, is registered

if __name__ == "__main__":
  sys.exit(main())
