"""Selective copying (Gu & Dao 2023, "Mamba", section 4.1.1 and appendix E.1).

The classic copying task with random spacing: `num_tokens` data tokens are scattered, in order, at
random positions of a stretch of noise, and after the stretch come `num_tokens` marker tokens; at the
i-th marker the model must output the i-th data token. Solving it needs content-aware (selective)
memory: a time-invariant model cannot know where the data tokens were. The layout follows the copying
generator of the S4 code base that Mamba's experiments used:

  vocabulary  0 = noise, 1 .. vocab_size - 2 = data tokens, vocab_size - 1 = marker
  sequence    [noise with num_tokens data tokens at sorted random positions] (seq_len - num_tokens)
              + [marker] * num_tokens
  targets     the data tokens, at the marker positions (the only positions scored)

Mamba's setting (appendix E.1): seq_len 4096, vocab_size 16 (noise and marker included),
num_tokens 16. Knobs: `seq_len` (how far data must be carried), `num_tokens` (how much), `vocab_size`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ssm_lab.data.base import Batch, SeededSynthetic


@dataclasses.dataclass
class SelectiveCopying(SeededSynthetic):
  """Seeded selective-copying generator implementing the `Task` protocol (kind "lm")."""

  vocab_size: int = 16
  seq_len: int = 4096
  num_tokens: int = 16
  seed: int = 0
  num_eval_examples: int = 1000
  name: str = "selective_copying"
  kind: str = "lm"
  num_classes: int = 0

  def __post_init__(self):
    if self.vocab_size < 3:
      raise ValueError(f"selective_copying: vocab_size={self.vocab_size} must be >= 3 (noise, marker "
                       f"and at least one data token)")
    if self.num_tokens < 1 or self.seq_len < 2 * self.num_tokens:
      raise ValueError(f"selective_copying: need num_tokens >= 1 and seq_len >= 2 * num_tokens "
                       f"(data tokens fit before the markers), got seq_len={self.seq_len}, "
                       f"num_tokens={self.num_tokens}")

  @property
  def marker(self) -> int:
    return self.vocab_size - 1

  def generate(self, rng: np.random.Generator, n: int) -> Batch:
    """`n` examples [n, seq_len] from `rng`."""
    m, length = self.num_tokens, self.seq_len
    context = length - m
    data = rng.integers(1, self.vocab_size - 1, size=(n, m))
    # Sorted random positions: a random m-subset of the context per example.
    where = np.sort(np.argsort(rng.random((n, context)), axis=1)[:, :m], axis=1)
    inputs = np.zeros((n, length), np.int32)
    np.put_along_axis(inputs, where, data, axis=1)
    inputs[:, context:] = self.marker
    targets = np.zeros((n, length), np.int32)
    targets[:, context:] = data
    loss_mask = np.zeros((n, length), np.float32)
    loss_mask[:, context:] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}
