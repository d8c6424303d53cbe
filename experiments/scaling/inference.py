"""Inference units of the scaling study, built on benchmarks/generation.py's functions and models
(random weights, bfloat16): decode tokens/s against batch (prompt 2,048, 128 new tokens, as the
Mamba paper's Figure 8), prefill time against prompt length, and the longest context each 1.3B model
fits for batch-1 decoding on an 80 GB GPU, in closed form (ssm_lab.models.cache_memory) and checked
on the device at a few lengths.

`import_generation(path)` turns a committed benchmarks/results/generation*.json into a study record
that keeps that file's device, date and commit.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCHES = (1, 16, 64, 256)
PROMPTS = (1024, 2048, 4096, 8192, 16384, 32768)
GPU_BYTES = 80 * 10**9  # "one 80 GB GPU": the H100's nominal 80 GB
RESERVE = 0.10          # kept free for the decode step's activations, XLA and the runtime
ARCHS = ("transformer", "mamba", "mamba2", "hybrid")


def generation_module() -> Any:
  from ssm_lab.experiments import load_file  # noqa: PLC0415

  return load_file(os.path.join(ROOT, "benchmarks", "generation.py"))


def _model(name: str, smoke: bool) -> tuple[Any, Any, Any]:
  """(generation module, LanguageModel, params) of a generation.py zoo model."""
  from ssm_lab.models.lm import LanguageModel, ModelArgs  # noqa: PLC0415

  g = generation_module()
  model = LanguageModel(ModelArgs(**g.model_zoo(smoke)[name]))
  return g, model, g.random_params(model)


def decode(name: str, smoke: bool = False) -> dict[str, Any]:
  """Decode tokens/s at every batch size; a batch whose weights + cache would pass 90% of the
  device's memory is reported as not run."""
  from ssm_lab.models import cache_memory  # noqa: PLC0415

  g, model, params = _model(name, smoke)
  prompt, new = (32, 8) if smoke else (g.PROMPT, g.NEW)
  limit = g.device_memory() or GPU_BYTES
  rows = []
  for batch in ((1, 2) if smoke else BATCHES):
    need = g.tree_bytes(params) + batch * cache_memory.cache_bytes_per_sequence(
        model.args, prompt + new)["total"]
    if need > 0.9 * limit:
      rows.append({"model": name, "batch": batch, "error": f"not run: needs {need / 1e9:.1f} GB"})
      continue
    try:
      rows.append(g.decode_case(name, model, params, batch, 3, prompt, new))
    except Exception as err:  # noqa: BLE001  (an OOM at one batch is a result)
      rows.append({"model": name, "batch": batch, "error": f"{type(err).__name__}: {str(err)[:300]}"})
    print(f"  decode {name} batch {batch}: {rows[-1].get('tokens_per_s', rows[-1].get('error'))}",
          flush=True)
  return {"model": name, "prompt": prompt, "new": new, "rows": rows}


def prefill(name: str, smoke: bool = False) -> dict[str, Any]:
  """Prefill time of one prompt (batch 1) against its length."""
  g, model, params = _model(name, smoke)
  rows = []
  for prompt in ((32, 64) if smoke else PROMPTS):
    try:
      rows.append(g.prefill_case(name, model, params, 1, 3, prompt, 1))
    except Exception as err:  # noqa: BLE001
      rows.append({"model": name, "prompt": prompt, "error": f"{type(err).__name__}: {str(err)[:300]}"})
    print(f"  prefill {name} prompt {prompt}: {rows[-1].get('prefill_s', rows[-1].get('error'))}",
          flush=True)
  return {"model": name, "rows": rows}


def fits_closed_form(size: str = "1.3b", memory_bytes: int = GPU_BYTES) -> dict[str, Any]:
  """Longest batch-1 decoding context per model: (memory x (1 - RESERVE) - weights) / cache bytes
  per token, from cache_memory's closed form (None: the cache does not grow with context)."""
  from ssm_lab.models import cache_memory  # noqa: PLC0415
  from ssm_lab.models.lm import ModelArgs  # noqa: PLC0415

  g = generation_module()
  rows = []
  for arch in ARCHS:
    name = f"{arch}-{size}"
    args = ModelArgs(**g.model_zoo(False)[name])
    weights = _param_bytes(args)
    at1k = cache_memory.cache_bytes_per_sequence(args, 1024)["total"]
    at2k = cache_memory.cache_bytes_per_sequence(args, 2048)["total"]
    per_token = (at2k - at1k) / 1024
    free = memory_bytes * (1 - RESERVE) - weights - (at1k - per_token * 1024)
    longest = int(free // per_token) if per_token > 0 else None
    rows.append({"model": name, "pattern": args.pattern, "weight_bytes": weights,
                 "cache_bytes_per_token": per_token, "constant_cache_bytes": at1k - per_token * 1024,
                 "longest_context": longest,
                 "cache_at_128k_bytes": cache_memory.cache_bytes_per_sequence(args, 131072)["total"]})
  return {"memory_bytes": memory_bytes, "reserve": RESERVE, "rows": rows}


def _param_bytes(args: Any) -> int:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from ssm_lab.models.lm import LanguageModel  # noqa: PLC0415

  shapes = jax.eval_shape(LanguageModel(args).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 1), jnp.int32))["params"]
  return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize
                 for s in jax.tree_util.tree_leaves(shapes)))


def fits_confirm(name: str, contexts: tuple[int, ...], smoke: bool = False) -> dict[str, Any]:
  """On the device: a filled batch-1 cache of each context and one decode step through it; "ok" or
  the error (out of memory), with the device's bytes in use after the step."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ssm_lab import generate as gen  # noqa: PLC0415

  g, model, params = _model(name, smoke)
  rows = []
  for context in contexts:
    row: dict[str, Any] = {"model": name, "context": context}
    t0 = time.perf_counter()
    try:
      cache = g.filled_cache(model, 1, context, context - 1, seed=0)
      logits, cache = gen.decode_step(model, params, jnp.zeros((1,), jnp.int32), cache)
      jax.block_until_ready(logits)
      row.update(ok=True, bytes_in_use=g.bytes_in_use(), cache_bytes=g.tree_bytes(cache))
      del cache, logits
    except Exception as err:  # noqa: BLE001  (out of memory is the answer sought)
      row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"  fits {name} context {context}: {row.get('ok')}", flush=True)
    rows.append(row)
  return {"model": name, "rows": rows}


def import_generation(path: str, study: str = "scaling") -> dict[str, Any]:
  """A study record from a committed generation benchmark JSON: its decode, prefill, memory and
  cache rows, labelled with that file's own device, date and commit (never the importer's)."""
  with open(path) as f:
    res = json.load(f)
  env = res["env"]
  kind = env["device"].replace("NVIDIA ", "").split()[0].lower()
  return {"name": f"gen-import-{kind}", "study": study, "status": "ok", "error": None,
          "tags": {"part": "generation-import", "source": os.path.relpath(path, ROOT)},
          "config": None, "metrics": {k: res.get(k) for k in ("settings", "models", "decode",
                                                              "prefill", "context_memory",
                                                              "cache_memory", "ratios")},
          "train": None, "wall_s": None,
          "device": {"backend": env.get("backend"), "kind": env["device"], "count": 1},
          "date": env["date"], "commit": env["commit"], "versions": {"jax": env.get("jax")},
          "imported": True}
