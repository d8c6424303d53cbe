"""Parameter counts and model-FLOPs-per-token estimates (the numerator of MFU).

Counts are matrix-multiply and scan FLOPs (a multiply-add is 2 FLOPs); elementwise work (norms,
activations, softmax) is left out, as is customary. Training FLOPs are 3x the forward (the backward
costs about twice the forward). Attention is causal: a token at position t attends t+1 keys, so the
score and value products average (L+1)/2 keys per token at sequence length L.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def param_count(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def mixer_flops_per_token(args: Any, letter: str, seq_len: int) -> float:
  """Forward FLOPs per token of one block's mixer (without its MLP sublayer)."""
  d = args.d_model
  if letter == "A":
    h, kvh, hd = args.num_heads, args.num_kv_heads, args.attn_head_dim
    proj = 2 * d * (h * hd + 2 * kvh * hd) + 2 * h * hd * d
    keys = (seq_len + 1) / 2
    if args.sliding_window:
      keys = min(keys, args.sliding_window)
    return proj + 2 * 2 * h * hd * keys
  if letter == "M":
    di, n = args.expand * d, args.d_state
    rank = args.dt_rank or math.ceil(d / 16)
    # in_proj, conv, x_proj, dt_proj, out_proj; the scan does ~9 FLOPs per (channel, state)
    # (discretise, decay, input, output), the count of Gu & Dao (2023, section 3.3).
    return (2 * d * 2 * di + 2 * di * args.d_conv + 2 * di * (rank + 2 * n) + 2 * rank * di
            + 9 * di * n + 2 * di * d)
  if letter == "S":
    from ssm_lab.layers.mamba2 import mamba2_flops_per_token  # noqa: PLC0415
    return mamba2_flops_per_token(d, args.ssd_d_state, args.ssd_head_dim, args.expand,
                                  args.ssd_n_groups, args.d_conv, args.ssd_chunk_size)
  if letter == "F":
    return 0.0
  raise ValueError(f"unknown layer letter {letter!r}")


def flops_per_token(args: Any, seq_len: int, *, training: bool = True) -> float:
  """Model FLOPs per token for `ssm_lab.models.ModelArgs` at sequence length `seq_len`."""
  mlp = 2 * 3 * args.d_model * args.ff_dim
  total = 0.0
  for letter in args.pattern:
    total += mixer_flops_per_token(args, letter, seq_len)
    if letter == "F" or args.block_mlp:
      total += mlp
  if args.head == "lm":
    total += 2 * args.d_model * args.vocab_size
  return 3 * total if training else total
