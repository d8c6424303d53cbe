"""Scaling study: attention's quadratic time and linear KV cache against the SSMs' linear time and
constant state, measured end to end (issue 26). Five parts, each a set of units:

  ops-<op>-<impl>[-w<window>]     one mixer's forward+backward time and memory against length (GPU)
  train-<size>-<arch>             training tokens/s and peak memory against length (GPU)
  gen-decode-<model>, gen-prefill-<model>, fits-*   generation throughput, prefill, longest context
  quality-<size>-<arch>-lr<lr>    eval loss and bits per byte against training FLOPs (GPU; cpu0p2m, cpu1m: CPU)
  edge-<model>                    batch-1 decode latency and resident memory on the CPU

The measuring code lives beside this file (ops.py, models.py, inference.py, quality.py, edge.py);
`table` and `plot` are in plot.py.
"""

from __future__ import annotations

import functools
import os
import types

from ssm_lab.experiments import Run, load_file

HERE = os.path.dirname(os.path.abspath(__file__))
EDGE_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
FITS_CONTEXTS = {"transformer": (131072, 262144, 393216), "hybrid": (524288, 1048576),
                 "mamba": (1048576,), "mamba2": (1048576,)}


def part(name: str) -> types.ModuleType:
  """A module of this folder (loaded by path: the study folder is not a package)."""
  return load_file(os.path.join(HERE, f"{name}.py"))


def _ops_runs(smoke: bool) -> list[Run]:
  ops = part("ops")
  units = ([("attention", "xla", None), ("scan", "associative", None), ("ssd", "chunked", None)]
           if smoke else ops.UNITS)
  return [Run(name=f"ops-{op}-{impl}" + ("" if w is None else f"-w{w}"),
              fn=functools.partial(ops.sweep, op, impl, w, smoke),
              tags=dict(part="ops", op=op, impl=impl, window=w)) for op, impl, w in units]


def _train_runs(smoke: bool) -> list[Run]:
  models = part("models")
  cells = [("smoke", "transformer")] if smoke else [(s, a) for s in models.SIZES
                                                    for a in models.SIZES[s]]
  return [Run(name=f"train-{s}-{a}", fn=functools.partial(models.sweep, s, a, smoke),
              tags=dict(part="train", size=s, arch=a)) for s, a in cells]


def _inference_runs(smoke: bool) -> list[Run]:
  inf = part("inference")
  names = (["mamba-tiny", "transformer-tiny"] if smoke else
           [f"{a}-{s}" for s in ("130m", "1.3b") for a in inf.ARCHS])
  out = []
  for name in names:
    arch, size = name.rsplit("-", 1)
    tags = dict(arch=arch, size=size, model=name)
    out.append(Run(name=f"gen-decode-{name}", fn=functools.partial(inf.decode, name, smoke),
                   tags=dict(part="decode", **tags)))
    out.append(Run(name=f"gen-prefill-{name}", fn=functools.partial(inf.prefill, name, smoke),
                   tags=dict(part="prefill", **tags)))
  out.append(Run(name="fits-closed-form", fn=inf.fits_closed_form, tags=dict(part="fits-model")))
  confirm = {"transformer-tiny": (256,)} if smoke else {
      f"{a}-1.3b": c for a, c in FITS_CONTEXTS.items()}
  out += [Run(name=f"fits-confirm-{name}",
              fn=functools.partial(inf.fits_confirm, name, contexts, smoke),
              tags=dict(part="fits-device", model=name)) for name, contexts in confirm.items()]
  return out


def _quality_runs(smoke: bool) -> list[Run]:
  if smoke:  # training needs the Gutenberg corpus; the smoke sweep checks configs only (tests)
    return []
  q = part("quality")
  return [Run(name=f"quality-{size}-{arch}-lr{lr:.1e}", config=q.make_config(arch, size, lr),
              evaluate=q.compute, tags=dict(part="quality", size=size, arch=arch, lr=lr))
          for size, spec in q.SIZES.items() for arch in q.ARCHS for lr in spec[-1]]


def _edge_runs(smoke: bool) -> list[Run]:
  edge = part("edge")
  models, contexts = ((edge.SMOKE_MODELS[:1], (64,)) if smoke else (edge.MODELS, EDGE_CONTEXTS))
  return [Run(name=f"edge-{m}", fn=functools.partial(edge.sweep_model, m, contexts,
                                                     2 if smoke else 8),
              tags=dict(part="edge", model=m)) for m in models]


def runs(smoke: bool = False) -> list[Run]:
  return (_ops_runs(smoke) + _train_runs(smoke) + _inference_runs(smoke) + _quality_runs(smoke)
          + _edge_runs(smoke))
