"""Multi-query associative recall (MQAR), as defined in Zoology (Arora et al. 2023, section 3).

A sequence opens with `num_kv_pairs` key-value pairs (keys drawn without replacement from the lower
half of the vocabulary, values without replacement from the upper half). The rest of the sequence
holds every key again as a query, at positions whose distance from the context follows a power law
with exponent `power_a` (small a: most queries come soon after the context, a few far away). The
model must emit the matching value right after each query key; only those positions are scored. Other
positions hold random tokens (`random_non_queries`) or zeros. Generated on the fly from a seed:
nothing is downloaded.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ssm_lab.data.base import Batch, SeededSynthetic


@dataclasses.dataclass
class MQAR(SeededSynthetic):
  """Seeded MQAR generator implementing the `Task` protocol (kind "lm")."""

  vocab_size: int = 8192
  seq_len: int = 256
  num_kv_pairs: int = 16
  power_a: float = 0.01
  random_non_queries: bool = True
  seed: int = 0
  num_eval_examples: int = 1000
  name: str = "mqar"
  kind: str = "lm"
  num_classes: int = 0

  def __post_init__(self):
    # The example has seq_len + 1 tokens (inputs are tokens[:-1], targets tokens[1:]).
    context = 2 * self.num_kv_pairs
    space = (self.seq_len + 1 - context) // 2
    if self.vocab_size < 4 or self.vocab_size // 2 - 1 < self.num_kv_pairs:
      raise ValueError(f"mqar: vocab_size={self.vocab_size} is too small for num_kv_pairs="
                       f"{self.num_kv_pairs} distinct keys (keys come from [1, vocab_size/2))")
    if space < self.num_kv_pairs:
      raise ValueError(f"mqar: seq_len={self.seq_len} leaves room for {space} queries after the "
                       f"{context}-token context, fewer than num_kv_pairs={self.num_kv_pairs}; "
                       f"need seq_len >= {4 * self.num_kv_pairs - 1}")
    if not self.power_a > 0:
      raise ValueError(f"mqar: power_a must be > 0, got {self.power_a}")
    gaps = np.arange(1, space + 1, dtype=np.float64)
    p = self.power_a * gaps ** (self.power_a - 1)
    self._gap_p = p / p.sum()
    self._space = space

  def generate(self, rng: np.random.Generator, n: int) -> Batch:
    """`n` examples from `rng`."""
    kv, space = self.num_kv_pairs, self._space
    half = self.vocab_size // 2
    keys = _distinct(rng, n, kv, 1, half)                     # from [1, half)
    # Values are distinct too, as in Zoology's generator (each value then names exactly one key).
    values = _distinct(rng, n, kv, half, self.vocab_size)     # from [half, vocab)
    context = np.empty((n, 2 * kv), np.int64)
    context[:, 0::2], context[:, 1::2] = keys, values
    # Query slots (even offsets after the context), without replacement with power-law odds: the kv
    # largest of log p + Gumbel noise are a draw without replacement in proportion to p (Gumbel
    # top-k), one vectorised step instead of a sampler call per example.
    scores = np.log(self._gap_p) + rng.gumbel(size=(n, space))
    slots = np.argpartition(-scores, kv - 1, axis=1)[:, :kv]
    total = self.seq_len + 1
    tail = np.zeros((n, total - 2 * kv), np.int64)
    labels = np.full((n, total), -1, np.int64)
    rows = np.arange(n)[:, None]
    tail[rows, 2 * slots] = keys
    labels[rows, 2 * kv + 2 * slots + 1] = values
    tokens = np.concatenate([context, tail], axis=1)
    if self.random_non_queries:
      filler = rng.integers(0, self.vocab_size, size=tokens.shape)
      free = np.zeros_like(tokens, bool)
      free[:, 2 * kv:] = tail == 0
      tokens = np.where(free, filler, tokens)
    # targets[j] is the value wherever inputs[j] is a query key; the value itself never appears in
    # the query region of the inputs.
    targets = labels[:, 1:]
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": np.maximum(targets, 0).astype(np.int32),
        "loss_mask": (targets >= 0).astype(np.float32),
    }


def _distinct(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
  """[n, k] integers from [low, high), distinct within each row, each row a uniform draw of an
  ordered k-subset: iid draws, with rows holding a repeat drawn again (rejection keeps the
  distribution exact). Costs O(n k) where sorting noise over the whole range cost O(n (high-low))."""
  out = rng.integers(low, high, size=(n, k))
  while True:
    s = np.sort(out, axis=1)
    bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
    if bad.size == 0:
      return out
    out[bad] = rng.integers(low, high, size=(bad.size, k))
