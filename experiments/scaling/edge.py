"""Edge unit of the scaling study: batch-1 decode latency per token and resident memory against
context length on the host CPU (a small device), for ~130M Transformer, Mamba and Mamba-2.

Random weights (the shapes of benchmarks/generation.py's 130M rows), float32 weights, activations and
cache (XLA's CPU backend computes bfloat16 by converting it). Each (model, context) point runs in
its own process, so its resident-memory peak (VmHWM) is its own: the process loads the weights,
builds the cache as a prefill of `context - 1` tokens leaves it, then times single decode steps
(each waited for; the median over `steps`).

  python experiments/scaling/edge.py --child transformer-130m --context 4096 --steps 8   # one point
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from ssm_lab.experiments import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")  # run_point, emit
MODELS = ("transformer-130m", "mamba-130m", "mamba2-130m")
SMOKE_MODELS = ("transformer-tiny", "mamba-tiny", "mamba2-tiny")
CONTEXTS = (1024, 4096, 16384, 32768, 65536)
SMOKE_CONTEXTS = (64, 256)
BUDGET_MS, BUDGET_GB = 100.0, 4.0  # a small device's budget: 100 ms a token, 4 GB resident


def generation_module() -> Any:
  """benchmarks/generation.py as a module (its model zoo, random weights and cache filler)."""
  return load_file(os.path.join(ROOT, "benchmarks", "generation.py"))


def _proc_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    return None
  return None


def measure_point(name: str, context: int, steps: int) -> dict[str, Any]:
  """In this process: one model's decode-step latency and memory at one context length."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from ssm_lab import generate as gen  # noqa: PLC0415
  from ssm_lab.models import cache_memory  # noqa: PLC0415
  from ssm_lab.models.lm import LanguageModel, ModelArgs  # noqa: PLC0415

  g = generation_module()
  spec = g.model_zoo(smoke=name.endswith("-tiny"))[name]
  args = ModelArgs(**dict(spec, dtype="float32", param_dtype="float32"))
  model = LanguageModel(args)
  rss0 = _proc_kib("VmRSS")
  params = g.random_params(model)
  param_bytes = g.tree_bytes(params)
  rss_params = _proc_kib("VmRSS")
  cache = g.filled_cache(model, 1, context, context - 1, seed=0)
  jax.block_until_ready(cache)
  rss_cache = _proc_kib("VmRSS")
  token = jnp.zeros((1,), jnp.int32)
  t0 = time.perf_counter()
  logits, cache = gen.decode_step(model, params, token, cache)
  jax.block_until_ready(logits)
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(steps + 1):  # one more warm-up step, then the timed ones
    t0 = time.perf_counter()
    logits, cache = gen.decode_step(model, params, token, cache)
    jax.block_until_ready(logits)
    times.append((time.perf_counter() - t0) * 1e3)
  times = times[1:]
  kib = lambda v: None if v is None else round(v / 2**20, 3)  # KiB -> GiB
  return {"model": name, "pattern": args.pattern, "context": context, "steps": steps,
          "ms_per_token": float(np.median(times)), "ms_min": float(min(times)),
          "ms_all": [round(t, 3) for t in times], "first_call_s": round(first_s, 2),
          "param_bytes": param_bytes,
          "cache_bytes": cache_memory.cache_bytes_per_sequence(args, context)["total"],
          "rss_start_gib": kib(rss0), "rss_params_gib": kib(rss_params),
          "rss_cache_gib": kib(rss_cache), "peak_rss_gib": kib(_proc_kib("VmHWM")),
          "threads": os.cpu_count()}


def sweep_model(name: str, contexts: tuple[int, ...], steps: int, timeout_s: float = 300.0,
                stop_over_gb: float = 14.0) -> dict[str, Any]:
  """Every context point of one model, each in a child process; stops at the first point that fails
  or whose predicted cache alone would exceed `stop_over_gb` (this host's share of memory)."""
  from ssm_lab.models import cache_memory  # noqa: PLC0415
  from ssm_lab.models.lm import ModelArgs  # noqa: PLC0415

  g = generation_module()
  spec = g.model_zoo(smoke=name.endswith("-tiny"))[name]
  args = ModelArgs(**dict(spec, dtype="float32", param_dtype="float32"))
  points, skipped = [], []
  for context in contexts:
    if cache_memory.cache_bytes_per_sequence(args, context)["total"] > stop_over_gb * 2**30:
      skipped.append({"context": context, "why": f"cache over {stop_over_gb} GiB"})
      continue
    t0 = time.perf_counter()
    point = load_file(CHILD).run_point(
        __file__, ["--child", name, "--context", str(context), "--steps", str(steps)], timeout_s,
        env={"JAX_PLATFORMS": "cpu"})
    if "error" in point:
      skipped.append({"context": context, "why": point["error"]})
      break
    point["wall_s"] = round(time.perf_counter() - t0, 1)
    points.append(point)
    print(f"  edge {name} context {context}: {point['ms_per_token']:.1f} ms/token, peak RSS "
          f"{point['peak_rss_gib']:.2f} GiB ({point['wall_s']} s)", flush=True)
  return {"model": name, "points": points, "skipped": skipped, "budget_ms": BUDGET_MS,
          "budget_gb": BUDGET_GB, "dtype": "float32", "weights": "random"}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--child", required=True, help="model name of benchmarks/generation.py's zoo")
  p.add_argument("--context", type=int, required=True)
  p.add_argument("--steps", type=int, default=8)
  a = p.parse_args()
  load_file(CHILD).emit(measure_point(a.child, a.context, a.steps))
  return 0


if __name__ == "__main__":
  sys.exit(main())
