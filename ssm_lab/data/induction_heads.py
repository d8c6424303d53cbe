"""Induction heads (Gu & Dao 2023, "Mamba", section 4.1.2 and appendix E.1; Olsson et al. 2022).

Associative recall of a bigram seen once: a special trigger token appears at a random place in a
sequence of random tokens, followed by an answer; the sequence ends with the trigger again, and the
model must then output the answer ("Harry Potter ... Harry -> Potter"). The construction follows the
induction-head generator of H3 (Fu, Dao et al. 2023) that Mamba's experiments build on:

  vocabulary  0 .. vocab_size - 2 ordinary tokens, vocab_size - 1 = trigger
  tokens      seq_len + 1 of them: random ordinary tokens, with the trigger at a random position p
              followed by `answer_len` answer tokens, and at the end the trigger again followed by the
              same answer tokens; inputs are tokens[:-1], targets tokens[1:]
  scored      only the `answer_len` positions after the final trigger

Mamba's setting: seq_len 256, vocab_size 16, answer_len 1, trained with random data every step and
tested on lengths 2^6 .. 2^20 (`eval_seq_len` builds the evaluation set at another length, which
probes extrapolation for models whose parameters do not depend on the length).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ssm_lab.data.base import Batch, SeededSynthetic


@dataclasses.dataclass
class InductionHeads(SeededSynthetic):
  """Seeded induction-heads generator implementing the `Task` protocol (kind "lm")."""

  vocab_size: int = 16
  seq_len: int = 256
  answer_len: int = 1
  seed: int = 0
  num_eval_examples: int = 1000
  eval_seq_len: int = 0          # 0: same as seq_len
  name: str = "induction_heads"
  kind: str = "lm"
  num_classes: int = 0

  def __post_init__(self):
    if self.vocab_size < 3:
      raise ValueError(f"induction_heads: vocab_size={self.vocab_size} must be >= 3")
    if self.answer_len < 1:
      raise ValueError(f"induction_heads: answer_len must be >= 1, got {self.answer_len}")
    for field in ("seq_len", "eval_seq_len"):
      n = getattr(self, field)
      if (field == "seq_len" or n) and n < 3 * self.answer_len + 2:
        raise ValueError(f"induction_heads: {field}={n} is too short for answer_len="
                         f"{self.answer_len}; need >= {3 * self.answer_len + 2}")

  @property
  def trigger(self) -> int:
    return self.vocab_size - 1

  def generate(self, rng: np.random.Generator, n: int, length: int | None = None) -> Batch:
    """`n` examples [n, length] from `rng` (length defaults to seq_len)."""
    length = length or self.seq_len
    k = self.answer_len
    total = length + 1
    tokens = rng.integers(0, self.vocab_size - 1, size=(n, total))
    answer = rng.integers(0, self.vocab_size - 1, size=(n, k))
    body = total - (k + 1)                       # the final trigger + answer take the tail
    # The first trigger and its answer must end before the tail starts.
    p = rng.integers(0, body - k, size=n)
    rows = np.arange(n)[:, None]
    tokens[rows[:, 0], p] = self.trigger
    tokens[rows, p[:, None] + 1 + np.arange(k)] = answer
    tokens[:, body] = self.trigger
    tokens[:, body + 1:] = answer
    loss_mask = np.zeros((n, length), np.float32)
    loss_mask[:, body:] = 1.0                    # targets[j] = tokens[j + 1]: the answer tokens
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": loss_mask}

  def eval_generate_kwargs(self) -> dict:
    return {"length": self.eval_seq_len or self.seq_len}
