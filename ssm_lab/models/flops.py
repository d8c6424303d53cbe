"""Parameter counts and model-FLOPs-per-token estimates (the numerator of MFU).

Counts are matrix-multiply and scan FLOPs (a multiply-add is 2 FLOPs); elementwise work (norms,
activations, softmax) is left out, as is customary. Training FLOPs are 3x the forward (the backward
costs about twice the forward). Attention is causal: a token at position t attends t+1 keys, so the
score and value products average (L+1)/2 keys per token at sequence length L.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ssm_lab.layers import registry


def param_count(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def mixer_flops_per_token(args: Any, letter: str, seq_len: int) -> float:
  """Forward FLOPs per token of one block's mixer (without its MLP sublayer), from the mixer's
  registry entry."""
  spec = registry.get(letter)
  return float(spec.flops_per_token(args, args.group(spec.name), seq_len))


def flops_per_token(args: Any, seq_len: int, *, training: bool = True) -> float:
  """Model FLOPs per token for `ssm_lab.models.ModelArgs` at sequence length `seq_len`."""
  mlp = 2 * 3 * args.d_model * args.ff_dim
  total = 0.0
  for letter in args.pattern:
    total += mixer_flops_per_token(args, letter, seq_len)
    if args.block_mlp and registry.get(letter).block_mlp:
      total += mlp
  if args.head == "lm":
    total += 2 * args.d_model * args.vocab_size
  return 3 * total if training else total
