"""Generation on the GPU: decode throughput against batch size, prefill, and cache memory against
context length, for ~130M and ~1.3B Transformer, Mamba, Mamba-2 and hybrid models (random weights,
bfloat16 weights and activations).

One script for one device call (see the `--budget_s` guard: sections run in the order below, each
case is skipped once the budget is spent, and results are written after every case):
  1. correctness: prefill + decode logits against the full forward pass (float32, every layer type);
  2. cache memory: bytes `init_cache` occupies on the device (memory_stats bytes_in_use delta) against
     the closed form of ssm_lab.models.cache_memory, per model and context length;
  3. memory against context (the largest models): each model's compiled decode step at batch 1
     for contexts 2k-128k: XLA's memory analysis (arguments + temporaries) beside the cache's size;
  4. decode throughput: 128 new tokens after a 2048-token context, batch 1 to 256, one compiled
     `lax.scan` of decode steps (ssm_lab.generate.decode_tokens, greedy), median of 3 after warm-up.
     The cache is laid out as a prefill of 2048 random tokens leaves it (attention slots 0..2047
     valid; random SSM states), so each step does exactly a real step's work; cases whose predicted
     weights + cache exceed 90% of the device memory are reported as OOM without running;
  5. prefill throughput: the 2048-token prompt at batch 1 and 16 (the cache it writes included).

Writes generation.json and generation.md under --out and prints the tables last. The whole sweep
(8 models x 4 batch sizes, each a separate compile of a 12-48 layer decode loop) likely needs more than
one 5-minute call: cases past --budget_s (default 230 s) are listed as skipped; rerun with --models.

  python -m benchmarks.generation --out /tmp/gen                    # on the GPU, stops at --budget_s
  python -m benchmarks.generation --out /tmp/gen --models transformer-1.3b,mamba-1.3b  # a subset
  python -m benchmarks.generation --out /tmp/gen --smoke            # tiny models, runs anywhere
  python -m benchmarks.generation --out DIR --memory_model_only     # the closed-form table alone

Imports only jax, numpy and ssm_lab's model, layer and generate modules (no ml-collections).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


from ssm_lab import generate as gen  # noqa: E402
from ssm_lab.models import cache_memory  # noqa: E402
from ssm_lab.models.flops import param_count  # noqa: E402
from ssm_lab.models.lm import LanguageModel, ModelArgs  # noqa: E402
from ssm_lab.provenance import git_commit  # noqa: E402

from benchmarks import ceilings  # noqa: E402

HBM_TBS = 2.46      # ceilings of the chip that runs: set in main() from benchmarks/ceilings.py
MATMUL_TFS = 736.0
VOCAB = 50280       # GPT-NeoX tokenizer padded to a multiple of 8, as the Mamba checkpoints use
PROMPT, NEW = 2048, 128


def model_zoo(smoke: bool) -> dict[str, dict[str, Any]]:
  """name -> ModelArgs fields. Sizes follow the Mamba paper's 130M and 1.3B rows (d_model 768 / 2048;
  Mamba and Mamba-2 with twice the layers of the Transformer, which has an MLP in every block)."""
  common = dict(vocab_size=VOCAB, dtype="bfloat16", param_dtype="bfloat16",
                mamba2=dict(d_state=128, head_dim=64, n_groups=1), mamba=dict(d_state=16))
  heads = lambda n: dict(attention=dict(num_heads=n, num_kv_heads=n))
  if smoke:
    common.update(vocab_size=97, dtype="float32", param_dtype="float32",
                  mamba2=dict(d_state=16, head_dim=16, n_groups=1))
    return {
        "transformer-tiny": dict(common, pattern="AA", d_model=64, block_mlp=True, **heads(4)),
        "mamba-tiny": dict(common, pattern="MMMM", d_model=64),
        "mamba2-tiny": dict(common, pattern="SSSS", d_model=64),
        "hybrid-tiny": dict(common, pattern="SSSA", d_model=64, **heads(4)),
    }
  return {
      "transformer-130m": dict(common, pattern="A" * 12, d_model=768, block_mlp=True, **heads(12)),
      "mamba-130m": dict(common, pattern="M" * 24, d_model=768),
      "mamba2-130m": dict(common, pattern="S" * 24, d_model=768),
      # Mamba-2 with one attention layer in eight (Nemotron-H / Jamba-like ratio).
      "hybrid-130m": dict(common, pattern="SSSSSSSA" * 3, d_model=768, **heads(12)),
      "transformer-1.3b": dict(common, pattern="A" * 24, d_model=2048, block_mlp=True,
                               **heads(16)),
      "mamba-1.3b": dict(common, pattern="M" * 48, d_model=2048),
      "mamba2-1.3b": dict(common, pattern="S" * 48, d_model=2048),
      "hybrid-1.3b": dict(common, pattern="SSSSSSSA" * 6, d_model=2048, **heads(16)),
  }


# ------------------------------------------------------------------------------------------------
# Helpers


def random_params(model: LanguageModel, seed: int = 0) -> Any:
  """Random weights of the model's shapes, drawn on the host with numpy and copied to the device:
  zero-mean matrices of standard deviation 0.02, unit norm scales and D, Mamba's A_log = log(1..d_state) and
  dt_bias = softplus^-1(0.01).

  Host-side on purpose: drawing a 1.3B model's weights with jax.random on the H100 took 128 s
  (2026-11-23, commit 65229ff; compiling the threefry programs, not running them), numpy takes
  seconds."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes["params"])
  rng = np.random.default_rng(seed)
  out = []
  for path, s in leaves:
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "D"):
      x = np.ones(s.shape, np.float32)
    elif name == "A_log":
      n = s.shape[-1] if len(s.shape) == 2 else 1
      base = np.log(np.arange(1, n + 1, dtype=np.float32)) if n > 1 else np.zeros((), np.float32)
      x = np.broadcast_to(base + 0.5, s.shape)
    elif name == "dt_bias":
      x = np.full(s.shape, np.log(np.expm1(0.01)), np.float32)
    else:
      # Uniform with standard deviation 0.02 (about twice as fast to draw as a normal here: 19 s
      # against 44 s for 1.3B; only the scale matters for timing and for keeping values in range).
      x = rng.random(s.shape, dtype=np.float32)
      x -= np.float32(0.5)
      x *= np.float32(0.02 * np.sqrt(12.0))
    out.append(jax.device_put(np.asarray(x).astype(s.dtype)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _cache_builder(model: LanguageModel, batch: int, max_len: int, filled: int) -> Callable:
  """key -> a cache as a prefill of `filled` tokens leaves it: attention slots 0..filled-1 valid
  with pseudo-random K/V, pseudo-random conv and SSM states, index = filled."""

  def build(key):
    cache = model.init_cache(batch, max_len)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(cache["blocks"])
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for (path, x), k in zip(leaves, keys[:len(leaves)], strict=True):
      name = str(getattr(path[-1], "key", path[-1]))
      if name == "pos":
        slots = jnp.arange(x.shape[1], dtype=jnp.int32)
        out.append(jnp.broadcast_to(jnp.where(slots < filled, slots, -1), x.shape))
      else:
        # A cheap pseudo-random fill (a sine of a scrambled index, |x| <= 0.5): threefry over a
        # 26 GB cache compiled for minutes on the H100; the values only need a realistic range.
        idx = jax.lax.iota(jnp.float32, x.size).reshape(x.shape)
        out.append((0.5 * jnp.sin(idx * 12.9898 + 78.233 * jax.random.uniform(k))).astype(
            x.dtype))
    return {"index": jnp.asarray(filled, jnp.int32),
            "blocks": jax.tree_util.tree_unflatten(treedef, out)}
  return build


def filled_cache(model: LanguageModel, batch: int, max_len: int, filled: int, seed: int) -> Any:
  """The cache of `_cache_builder`, built on the device."""
  return jax.jit(_cache_builder(model, batch, max_len, filled))(jax.random.PRNGKey(seed))


def compile_decode(model: LanguageModel, params: Any, batch: int, prompt: int, new: int) -> Any:
  """The compiled `decode_tokens` loop for one batch size (called from worker threads: XLA
  compiles in parallel, so a model's batch sizes cost about one compile instead of four)."""
  build = _cache_builder(model, batch, prompt + new, prompt)
  cache = jax.eval_shape(build, jax.random.PRNGKey(0))
  token = jax.ShapeDtypeStruct((batch,), jnp.int32)
  p_abs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  return gen.decode_tokens.lower(model, p_abs, token, cache, jax.random.PRNGKey(0),
                                 steps=new).compile()


def precompile(fns: dict[Any, Callable[[], Any]]) -> dict[Any, Any]:
  """Runs the compile thunks in a thread pool; a failing one maps to its exception."""
  from concurrent.futures import ThreadPoolExecutor
  out: dict[Any, Any] = {}
  with ThreadPoolExecutor(max_workers=max(1, min(len(fns), 8))) as pool:
    futures = {k: pool.submit(f) for k, f in fns.items()}
    for k, fut in futures.items():
      try:
        out[k] = fut.result()
      except Exception as err:  # noqa: BLE001  (reported by the case that needs it)
        out[k] = err
  return out


def bytes_in_use() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("bytes_in_use", 0))


def device_memory() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("bytes_limit", 0)) or None


def tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


T0 = time.perf_counter()


def log(*parts: Any) -> None:
  """print, prefixed with the seconds since the script started (a cut-off run says where it was)."""
  print(f"[{time.perf_counter() - T0:7.1f}s]", *parts, flush=True)


class Budget:
  def __init__(self, seconds: float):
    self.start, self.seconds = time.perf_counter(), seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.start)


# ------------------------------------------------------------------------------------------------
# Sections


def check_correctness(smoke: bool) -> dict[str, Any]:
  """float32, every layer type: prefill of 200 tokens + 8 decode steps vs the full forward."""
  args = ModelArgs(pattern="MSAFA", d_model=64 if smoke else 256, vocab_size=97, block_mlp=True,
                   attention=dict(num_heads=4, num_kv_heads=2, sliding_window=0),
                   mamba2=dict(d_state=16, head_dim=32, chunk_size=32))
  model = LanguageModel(args)
  prompt_len, steps = (20, 4) if smoke else (200, 8)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, prompt_len + steps), 0, 97)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
  full = jax.jit(model.apply)({"params": params}, tokens)
  cache = gen.init_cache(model, 2, prompt_len + steps)
  logits, cache = gen.prefill(model, params, tokens[:, :prompt_len], cache)
  errs = [float(jnp.max(jnp.abs(logits - full[:, prompt_len - 1])))]
  for t in range(prompt_len, prompt_len + steps):
    logits, cache = gen.decode_step(model, params, tokens[:, t], cache)
    errs.append(float(jnp.max(jnp.abs(logits - full[:, t]))))
  scale = float(jnp.max(jnp.abs(full)))
  return {"pattern": args.pattern, "prompt": prompt_len, "steps": steps,
          "max_abs_err": max(errs), "max_abs_logit": scale, "ok": max(errs) <= 1e-3 * max(scale, 1)}


def cache_memory_case(name: str, args: ModelArgs, batch: int, context: int) -> dict[str, Any]:
  predicted = cache_memory.cache_bytes_per_sequence(args, context)["total"] * batch
  before = bytes_in_use()
  cache = jax.jit(lambda: args_cache(args, batch, context))()
  jax.block_until_ready(cache)
  after = bytes_in_use()
  measured = None if before is None else after - before
  row = {"model": name, "batch": batch, "context": context, "predicted_bytes": predicted,
         "allocated_bytes": tree_bytes(cache), "measured_bytes": measured}
  del cache
  return row


def args_cache(args: ModelArgs, batch: int, context: int) -> Any:
  from ssm_lab.models.lm import init_cache
  return init_cache(args, batch, context)


def decode_case(name: str, model: LanguageModel, params: Any, batch: int, repeats: int,
                prompt: int, new: int, compiled: Any = None) -> dict[str, Any]:
  """Times the decode loop; `compiled` (from compile_decode) skips the compile, an exception
  from it is raised here so the case reports it."""
  if isinstance(compiled, Exception):
    raise compiled
  max_len = prompt + new
  cache = filled_cache(model, batch, max_len, prompt, seed=batch)
  token = jax.random.randint(jax.random.PRNGKey(batch), (batch,), 0, model.args.vocab_size)
  key = jax.random.PRNGKey(0)
  state = {"cache": cache}

  def run():
    if compiled is not None:
      toks, state["cache"] = compiled(params, token, state["cache"], key)
    else:
      toks, state["cache"] = gen.decode_tokens(model, params, token, state["cache"], key,
                                               steps=new)
    return toks

  t0 = time.perf_counter()
  jax.block_until_ready(run())            # compile + first run
  first = time.perf_counter() - t0
  # Later runs reuse the advanced cache: positions wrap into the same slots, the work is the same.
  med, times = median_time(run, repeats)
  state.clear()   # free the cache before the next case
  per_step = med / new
  return {"model": name, "batch": batch, "context": max_len, "new_tokens": new,
          "decode_s": med, "decode_times_s": times, "ms_per_step": 1e3 * per_step,
          "tokens_per_s": batch * new / med, "first_call_s": first,
          "compile_s_approx": first - med}


def prefill_case(name: str, model: LanguageModel, params: Any, batch: int, repeats: int,
                 prompt: int, new: int) -> dict[str, Any]:
  tokens = jax.random.randint(jax.random.PRNGKey(7), (batch, prompt), 0, model.args.vocab_size)

  @jax.jit
  def run(p, t):
    cache = model.init_cache(batch, prompt + new)
    logits, cache = model.apply({"params": p}, t, cache=cache, mode="prefill",
                                last_logits_only=True)
    return logits, cache

  t0 = time.perf_counter()
  jax.block_until_ready(run(params, tokens))
  first = time.perf_counter() - t0
  med, times = median_time(lambda: run(params, tokens), repeats)
  return {"model": name, "batch": batch, "prompt": prompt, "prefill_s": med,
          "prefill_times_s": times, "prompt_tokens_per_s": batch * prompt / med,
          "first_call_s": first}


def context_memory_case(name: str, model: LanguageModel, params: Any, context: int,
                        batch: int = 1) -> dict[str, Any]:
  cache = jax.eval_shape(lambda: model.init_cache(batch, context))
  token = jax.ShapeDtypeStruct((batch,), jnp.int32)
  compiled = gen.decode_step.lower(model, params, token, cache).compile()
  mem = compiled.memory_analysis()
  return {"model": name, "batch": batch, "context": context,
          "cache_bytes": cache_memory.allocated_cache_bytes(model.args, batch, context),
          "param_bytes": sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                             for x in jax.tree_util.tree_leaves(params)),
          "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
          "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
          "output_bytes": getattr(mem, "output_size_in_bytes", None)}


def _raise_or(value: Any) -> Any:
  if isinstance(value, Exception):
    raise value
  return value


def floor_step_s(args: ModelArgs, param_bytes: int, n_params: int, batch: int,
                 context: int) -> tuple[float, float]:
  """(memory floor, compute floor) of one decode step in seconds at the measured ceilings of the
  chip that runs (benchmarks/ceilings.py, set in main):
  every weight and the whole cache read once; 2 FLOPs per weight per token plus the attention
  products (4 * context * heads * head_dim per attention layer and token)."""
  cache = cache_memory.cache_bytes_per_sequence(args, context)["total"] * batch
  a = args.attention
  attn = 4 * context * a.num_heads * (a.head_dim or args.d_model // a.num_heads) * args.pattern.count("A")
  flops = batch * (2 * n_params + attn)
  return (param_bytes + cache) / (HBM_TBS * 1e12), flops / (MATMUL_TFS * 1e12)


def decode_ratios(decode: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """tokens/s of each non-Transformer model over the Transformer of its size, per batch."""
  out = []
  for r in decode:
    if "tokens_per_s" not in r or r["model"].startswith("transformer"):
      continue
    size = r["model"].rsplit("-", 1)[1]
    base = [t for t in decode if t["model"] == f"transformer-{size}" and t["batch"] == r["batch"]
            and "tokens_per_s" in t]
    if base:
      out.append({"model": r["model"], "batch": r["batch"],
                  "ratio": r["tokens_per_s"] / base[-1]["tokens_per_s"]})
  return out


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """One result from several device calls of this script (later runs win for a row that both
  measured; a measured row beats a skipped one). Each row keeps the commit of the run it came from."""
  keys = {"cache_memory": ("model", "batch", "context"), "decode": ("model", "batch"),
          "prefill": ("model", "batch"), "context_memory": ("model", "context")}
  out: dict[str, Any] = {"env": dict(runs[-1]["env"]), "settings": runs[-1]["settings"],
                         "models": {}, "memory_model": {"contexts": [], "rows": {}},
                         "floors": {"batches": [], "rows": {}}}
  out["env"]["commit"] = ", ".join(dict.fromkeys(r["env"]["commit"] for r in runs))
  out["env"]["runs"] = [r["env"] for r in runs]
  for r in runs:
    if (r["settings"]["prompt"], r["settings"]["new"]) != (out["settings"]["prompt"],
                                                           out["settings"]["new"]):
      raise ValueError(f"merge: run of commit {r['env']['commit']} has prompt/new "
                       f"{r['settings']['prompt']}/{r['settings']['new']}, the last run "
                       f"{out['settings']['prompt']}/{out['settings']['new']}")
    out["models"].update(r["models"])
    for part, axis in (("memory_model", "contexts"), ("floors", "batches")):
      if r.get(part):
        out[part]["rows"].update(r[part]["rows"])
        out[part][axis] = r[part][axis]
    if r.get("correctness") and "error" not in r["correctness"]:
      out["correctness"] = {**r["correctness"], "commit": r["env"]["commit"]}
  for section, key in keys.items():
    rows: dict[tuple, dict[str, Any]] = {}
    for r in runs:
      for row in r.get(section, []):
        k = tuple(row.get(f) for f in key)
        measured = "skipped" not in row and "error" not in row
        if measured or k not in rows or "skipped" in rows[k] or "error" in rows[k]:
          rows[k] = {**row, "commit": r["env"]["commit"]} if measured else row
    out[section] = list(rows.values())
  out["ratios"] = decode_ratios(out["decode"])
  return out


# ------------------------------------------------------------------------------------------------
# Report


def gib(b: float | None) -> str:
  return "-" if b is None else f"{b / 2**30:.3f}"


def markdown(res: dict[str, Any]) -> str:
  env = res["env"]
  ceil = ceilings.for_device(env["device"])
  hbm_tbs, matmul_tfs = ceil.hbm_tb_s, ceil.matmul_tf_s
  if res["settings"].get("memory_model_only"):
    lines = [f"# Generation benchmark: closed-form cache memory only ({env['date']}, commit "
             f"{env['commit']}, jax {env['jax']}, computed on {env['device']})", "",
             "The GPU sections (device cache memory, decode and prefill throughput, decode memory "
             "against context) have not been run: `python -m benchmarks.generation --out DIR` on "
             "a GPU fills them in.", ""]
  else:
    lines = [f"# Generation benchmark ({env['device']}, {env['date']}, commit {env['commit']}, "
             f"jax {env['jax']})", "",
             f"Random weights, bfloat16 weights and activations; decode = "
             f"{res['settings']['new']} greedy tokens after a {res['settings']['prompt']}-token "
             f"context in one compiled `lax.scan`; medians of 3 after warm-up. HBM floor = bytes "
             f"a step must read (weights + whole cache) / {hbm_tbs} TB/s.", ""]
    if env.get("runs"):
      lines += ["Merged from several device calls (each measured row records its commit in the "
                "JSON): " + "; ".join(f"commit {r['commit']} ({r['device']}, {r['date']})"
                                       for r in env["runs"]) + ".", ""]
  c = res.get("correctness")
  if c:
    lines += [f"Correctness (float32, pattern {c.get('pattern')}): prefill + decode vs full forward, "
              f"max |diff| {c.get('max_abs_err', float('nan')):.2e} on logits up to "
              f"{c.get('max_abs_logit', float('nan')):.2f}: {'OK' if c.get('ok') else 'FAIL'}", ""]
  lines += ["## Models", "", "| model | pattern | parameters |", "|---|---|---:|"]
  for name, m in res["models"].items():
    lines.append(f"| {name} | {m['pattern'][:24]}{'...' if len(m['pattern']) > 24 else ''} | "
                 f"{m['params'] / 1e6:.1f}M |")
  if res["cache_memory"]:
    lines += ["", "## Cache memory: closed form vs device", "",
              "| model | batch | context | predicted GiB | allocated GiB | measured GiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in res["cache_memory"]:
      lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {gib(r['predicted_bytes'])} "
                   f"| {gib(r['allocated_bytes'])} | {gib(r['measured_bytes'])} |")
  if res["decode"]:
    lines += ["", "## Decode throughput (generated tokens/s)", "",
              "| model | batch | ms/step | tokens/s | HBM floor ms/step | of HBM peak |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in res["decode"]:
      if "error" in r or "skipped" in r:
        lines.append(f"| {r['model']} | {r['batch']} | {r.get('skipped') or r.get('error')} | | | |")
        continue
      floor = r["hbm_bytes_per_step"] / (hbm_tbs * 1e12)
      lines.append(f"| {r['model']} | {r['batch']} | {r['ms_per_step']:.2f} | "
                   f"{r['tokens_per_s']:,.0f} | {1e3 * floor:.2f} | "
                   f"{floor / (r['ms_per_step'] / 1e3):.0%} |")
  if res["ratios"]:
    lines += ["", "## Decode throughput relative to the Transformer of the same size", "",
              "| model | batch | tokens/s ratio |", "|---|---:|---:|"]
    for r in res["ratios"]:
      lines.append(f"| {r['model']} | {r['batch']} | {r['ratio']:.2f}x |")
  if res["prefill"]:
    lines += ["", f"## Prefill ({res['settings']['prompt']}-token prompt)", "",
              "| model | batch | s | prompt tokens/s |",
              "|---|---:|---:|---:|"]
    for r in res["prefill"]:
      if "prefill_s" not in r:
        lines.append(f"| {r['model']} | {r['batch']} | {r.get('skipped') or r.get('error')} | |")
        continue
      lines.append(f"| {r['model']} | {r['batch']} | {r['prefill_s']:.3f} | "
                   f"{r['prompt_tokens_per_s']:,.0f} |")
  if res["context_memory"]:
    lines += ["", "## Decode memory against context (batch 1)", "",
              "| model | context | cache GiB | params GiB | step arguments GiB | step temporaries GiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in res["context_memory"]:
      if "cache_bytes" not in r:
        lines.append(f"| {r['model']} | {r['context']} | {r.get('skipped') or r.get('error')} | | "
                     f"| |")
        continue
      lines.append(f"| {r['model']} | {r['context']} | {gib(r['cache_bytes'])} | "
                   f"{gib(r['param_bytes'])} | {gib(r['argument_bytes'])} | "
                   f"{gib(r['temp_bytes'])} |")
  if res["memory_model"]:
    lines += ["", "## Closed-form cache bytes per sequence (ssm_lab.models.cache_memory)", "",
              "| model | " + " | ".join(f"ctx {n}" for n in res["memory_model"]["contexts"]) + " |",
              "|---|" + "---:|" * len(res["memory_model"]["contexts"])]
    for name, row in res["memory_model"]["rows"].items():
      lines.append(f"| {name} | " + " | ".join(f"{b / 2**20:,.2f} MiB" for b in row) + " |")
    lines += ["", "Per sequence; multiply by the batch. Attention layers hold K and V in bfloat16 "
              "(plus an int32 position per slot); Mamba / Mamba-2 layers a bfloat16 conv state and "
              "a float32 SSM state, the same at every context length."]
  if res.get("floors"):
    lines += ["", "## Predicted decode ceiling (not a measurement)", "",
              f"tokens/s = batch / max(memory floor, compute floor) of one step at context "
              f"{res['settings']['prompt'] + res['settings']['new']}, from the measured "
              f"ceilings of the {env['device']} ({hbm_tbs} TB/s, {matmul_tfs} TF/s bf16); OOM where "
              f"weights + cache exceed {res['floors'].get('memory_gb', 80):.0f} GB.", "",
              "| model | " + " | ".join(f"batch {b}" for b in res["floors"]["batches"]) + " |",
              "|---|" + "---:|" * len(res["floors"]["batches"])]
    for name, row in res["floors"]["rows"].items():
      lines.append(f"| {name} | " + " | ".join("OOM" if v is None else f"{v:,.0f}" for v in row)
                   + " |")
  return "\n".join(lines) + "\n"


def write_results(out_dir: str, res: dict[str, Any]) -> None:
  with open(os.path.join(out_dir, "generation.json"), "w") as f:
    json.dump(res, f, indent=1, default=str)
  with open(os.path.join(out_dir, "generation.md"), "w") as f:
    f.write(markdown(res))


def env_info(commit: str = "") -> dict[str, str]:
  return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "date": datetime.date.today().isoformat(), "commit": git_commit(commit),
          "jax": jax.__version__}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--smoke", action="store_true", help="tiny models and shapes (any backend)")
  p.add_argument("--memory_model_only", action="store_true",
                 help="write the closed-form cache table only (no device work)")
  p.add_argument("--budget_s", type=float, default=230.0,
                 help="stop starting new cases after this many seconds")
  p.add_argument("--models", default="",
                 help="comma-separated subset of the model names, run in this order")
  p.add_argument("--decode_models", default="",
                 help="comma-separated: time decode (and prefill) only for these (default: all)")
  p.add_argument("--batches", default="1,16,64,256")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--commit", default="", help="git commit to record (default: git rev-parse)")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="write one generation.{json,md} under --out from these earlier results "
                      "(oldest first) and exit; no device work")
  args = p.parse_args()
  if args.merge:
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for path in args.merge:
      with open(path) as f:
        runs.append(json.load(f))
    merged = merge_runs(runs)
    write_results(args.out, merged)
    print(markdown(merged))
    return 0
  os.makedirs(args.out, exist_ok=True)
  global HBM_TBS, MATMUL_TFS
  ceil = ceilings.for_device()
  HBM_TBS, MATMUL_TFS = ceil.hbm_tb_s, ceil.matmul_tf_s
  budget = Budget(args.budget_s)
  zoo = model_zoo(args.smoke)
  if args.models:
    zoo = {k: v for k, v in zoo.items() if k in args.models.split(",")}
  prompt, new = (32, 8) if args.smoke else (PROMPT, NEW)
  batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
  contexts = [64, 256] if args.smoke else [2048, 8192, 32768, 131072]

  res: dict[str, Any] = {"env": env_info(args.commit), "settings": {
      "prompt": prompt, "new": new, "batches": batches, "smoke": args.smoke,
      "memory_model_only": args.memory_model_only},
                         "models": {}, "cache_memory": [], "decode": [], "ratios": [],
                         "prefill": [], "context_memory": [], "memory_model": {}}
  margs = {name: ModelArgs(**kw) for name, kw in zoo.items()}
  for name, a in margs.items():
    shapes = jax.eval_shape(LanguageModel(a).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1), jnp.int32))["params"]
    res["models"][name] = {"pattern": a.pattern, "params": param_count(shapes),
                           "param_bytes": sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                                              for s in jax.tree_util.tree_leaves(shapes))}
  floor_batches = [1, 16, 64, 256]
  memory_bytes = device_memory() or 80e9
  res["floors"] = {"batches": floor_batches, "rows": {}, "memory_gb": memory_bytes / 1e9}
  for name, a in margs.items():
    m = res["models"][name]
    row = []
    for b in floor_batches:
      mem_s, flop_s = floor_step_s(a, m["param_bytes"], m["params"], b, prompt + new)
      fits = m["param_bytes"] + cache_memory.cache_bytes_per_sequence(
          a, prompt + new)["total"] * b <= memory_bytes
      row.append(b / max(mem_s, flop_s) if fits else None)
    res["floors"]["rows"][name] = row
  res["memory_model"] = {"contexts": [1024, 2176, 8192, 32768, 131072],
                         "rows": {n: [cache_memory.cache_bytes_per_sequence(a, c)["total"]
                                      for c in [1024, 2176, 8192, 32768, 131072]]
                                  for n, a in margs.items()}}

  def save():
    write_results(args.out, res)

  def guarded(section: list, row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    if budget.left() <= 0:
      section.append({**row, "skipped": "budget"})
      return
    try:
      section.append(fn())
    except Exception as err:  # noqa: BLE001  (one failing case must not lose the others)
      traceback.print_exc()
      section.append({**row, "error": f"{type(err).__name__}: {str(err)[:200]}"})
    save()
    log(json.dumps(section[-1], default=str)[:300])

  if args.memory_model_only:
    save()
    print(markdown(res))
    return 0

  log(json.dumps(res["env"]))
  try:
    res["correctness"] = check_correctness(args.smoke)
  except Exception as err:  # noqa: BLE001
    traceback.print_exc()
    res["correctness"] = {"error": f"{type(err).__name__}: {err}"}
  save()
  log("correctness", res["correctness"])

  for name, a in margs.items():
    for batch, ctx in ((8, prompt + new), (1, contexts[-1])):
      guarded(res["cache_memory"], {"model": name, "batch": batch, "context": ctx},
              lambda n=name, a=a, b=batch, c=ctx: cache_memory_case(n, a, b, c))

  limit = device_memory()
  by_size: dict[str, list[str]] = {}
  # Smallest models first, or the order --models gives.
  order = ([n for n in args.models.split(",") if n in margs] if args.models else
           sorted(margs, key=lambda n: res["models"][n]["params"]))
  for name in order:
    by_size.setdefault(name.rsplit("-", 1)[1], []).append(name)

  # Memory against context first: compile-only, cheap, and what the constant-state claim is about.
  for name in list(by_size.values())[-1]:
    model = LanguageModel(margs[name])
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 1), jnp.int32))["params"]
    rows = precompile({c: functools.partial(context_memory_case, name, model, abstract, c)
                       for c in contexts}) if budget.left() > 0 else {}
    for ctx in contexts:
      guarded(res["context_memory"], {"model": name, "context": ctx},
              lambda c=ctx: _raise_or(rows[c]))
  # Then decode (the comparison the section is about), smallest models first.
  decode_only = [n for n in args.decode_models.split(",") if n]
  for names in by_size.values():
    for name in names:
      a = margs[name]
      if decode_only and name not in decode_only:
        continue
      if budget.left() <= 0:
        res["decode"] += [{"model": name, "batch": b, "skipped": "budget"} for b in batches]
        continue
      model = LanguageModel(a)
      params = jax.block_until_ready(random_params(model))
      log(f"{name}: random weights ready")
      pbytes = tree_bytes(params)
      fits = [b for b in batches if not limit or pbytes + cache_memory.cache_bytes_per_sequence(
          a, prompt + new)["total"] * b <= 0.9 * limit]
      t0 = time.perf_counter()
      compiled = precompile({b: functools.partial(compile_decode, model, params, b, prompt, new)
                             for b in fits})
      log(f"{name}: compiled decode for batches {fits} in {time.perf_counter() - t0:.1f} s")
      for b in batches:
        cache_b = cache_memory.cache_bytes_per_sequence(a, prompt + new)["total"] * b
        row = {"model": name, "batch": b}
        if limit and pbytes + cache_b > 0.9 * limit:
          res["decode"].append({**row, "skipped": f"OOM (predicted {gib(pbytes + cache_b)} GiB "
                                                 f"of {gib(limit)})"})
          continue
        # Bytes a step must read at least: the weights (an untied embedding table is only
        # gathered, `batch` rows of it) and the whole cache.
        emb = a.vocab_size * a.d_model * np.dtype(a.params_dtype).itemsize
        floor_bytes = pbytes - (0 if a.tie_embeddings else emb) + cache_b
        guarded(res["decode"], row,
                lambda n=name, m=model, pr=params, b=b, fb=floor_bytes, cs=compiled: {
                    **decode_case(n, m, pr, b, args.repeats, prompt, new, cs.get(b)),
                    "hbm_bytes_per_step": fb})
      del params, compiled
    res["ratios"] = decode_ratios(res["decode"])
    save()

  for names in by_size.values():
    for name in names:
      if decode_only and name not in decode_only:
        continue
      if budget.left() <= 0:
        res["prefill"] += [{"model": name, "batch": b, "skipped": "budget"} for b in (1, 16)]
        continue
      model = LanguageModel(margs[name])
      params = random_params(model)
      for b in (1, 16) if not args.smoke else (1,):
        guarded(res["prefill"], {"model": name, "batch": b},
                lambda n=name, m=model, pr=params, b=b: prefill_case(n, m, pr, b, args.repeats,
                                                                    prompt, new))
      del params

  save()
  print(markdown(res), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
