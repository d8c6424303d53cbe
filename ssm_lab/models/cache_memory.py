"""How much memory decoding needs per sequence, as a function of context length, per architecture.

The decoding cache of `ssm_lab.models.lm.init_cache`, counted in closed form by each mixer's registry
entry (`cache_bytes`), for example:

  attention layer   2 * T * kv_heads * head_dim * bytes(dtype)   K and V
                    + 4 * T                                         int32 slot positions
                    with T = min(context, sliding_window) when a window is set, else context
  Mamba layer       (d_conv - 1) * d_inner * bytes(dtype)           conv state
                    + 4 * d_inner * d_state                         float32 SSM state
  Mamba-2 layer     (d_conv - 1) * (d_inner + 2 * n_groups * d_state) * bytes(dtype)
                    + 4 * heads * head_dim * d_state                float32 SSM state
  MLP-only block    0

so a Transformer's cache grows linearly with the context while an SSM's stays constant (a sliding
window caps attention at the window). `allocated_cache_bytes` measures what `init_cache` really
allocates (through `jax.eval_shape`, nothing is allocated); the tests hold the two equal for every
registered mixer, and benchmarks/generation.py checks them against the device's memory counters.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ssm_lab.layers import registry
from ssm_lab.models.lm import ModelArgs, init_cache

# Columns every row carries (a mixer may add its own, e.g. "state" for a recurrent network).
KINDS = ("kv", "conv", "ssm")


def layer_cache_bytes(args: ModelArgs, letter: str, context_len: int) -> dict[str, int]:
  """Bytes of one block's cache for one sequence: {"kv": ..., "conv": ..., "ssm": ..., ...}."""
  spec = registry.get(letter)
  out = dict.fromkeys(KINDS, 0)
  if not spec.stateless:
    if spec.cache_bytes is None:
      raise ValueError(f"layer letter {letter!r} (pattern {args.pattern!r}) has a cache but no "
                       f"cache_bytes rule in its registry entry")
    for k, v in spec.cache_bytes(args, args.group(spec.name), context_len).items():
      out[k] = out.get(k, 0) + int(v)
  return out


def cache_bytes_per_sequence(args: ModelArgs, context_len: int) -> dict[str, int]:
  """{"kv", "conv", "ssm", "total"}: the whole model's decoding cache for one sequence whose prompt
  plus generated tokens number `context_len`."""
  if context_len < 1:
    raise ValueError(f"context_len must be >= 1, got {context_len}")
  out = dict.fromkeys(KINDS, 0)
  for letter in args.pattern:
    for k, v in layer_cache_bytes(args, letter, context_len).items():
      out[k] = out.get(k, 0) + v
  out["total"] = sum(out.values())
  return out


def allocated_cache_bytes(args: ModelArgs, batch: int, context_len: int) -> int:
  """Bytes `init_cache(args, batch, context_len)` allocates (the step counter included), from the
  shapes alone."""
  shapes = jax.eval_shape(lambda: init_cache(args, batch, context_len))
  return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize
                 for s in jax.tree_util.tree_leaves(shapes)))


def cache_table(models: dict[str, ModelArgs], context_lens: list[int]) -> list[dict[str, Any]]:
  """Rows {"model", "pattern", "context", "kv", "conv", "ssm", "total"} (bytes per sequence)."""
  return [{"model": name, "pattern": a.pattern, "context": n, **cache_bytes_per_sequence(a, n)}
          for name, a in models.items() for n in context_lens]
