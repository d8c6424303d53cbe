"""Group word problems: S5 / A5 permutation composition (Merrill, Petty & Sabharwal 2024, "The
Illusion of State in State-Space Models", ICML; after Liu et al. 2023, "Transformers Learn Shortcuts
to Automata").

Inputs are a sequence of group elements g_1 .. g_n drawn uniformly; the target at every position i is
the running product P_i = g_1 g_2 ... g_i, the state of the automaton after i moves. For the
non-solvable groups S5 and A5 this word problem is NC1-complete, so (under standard conjectures) no
constant-depth Transformer or linear SSM solves it at all lengths; solvable groups such as Z60 or
A4xZ5 (same order as A5) are the controls. Every position is scored.

Groups: "S<n>" (all permutations of n items), "A<n>" (the even ones), "Z<n>" (cyclic), and direct
products written with "x" ("A4xZ5"). Elements are token ids 0 .. |G| - 1, the identity is 0;
permutations are numbered in lexicographic order of their one-line form. Products compose left to
right: (a b)(x) = b(a(x)), i.e. P_i is "apply g_1, then g_2, ..., then g_i".
Knobs: `group`, `seq_len` (the difficulty grows with length), `eval_seq_len` (length extrapolation).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import numpy as np

from ssm_lab.data.base import Batch, SeededSynthetic


def _permutation_group(n: int, even_only: bool) -> np.ndarray:
  perms = [p for p in itertools.permutations(range(n))
           if not even_only or _parity(p) == 0]
  index = {p: i for i, p in enumerate(perms)}
  table = np.empty((len(perms), len(perms)), np.int32)
  for i, a in enumerate(perms):
    for j, b in enumerate(perms):
      table[i, j] = index[tuple(b[a[x]] for x in range(n))]
  return table


def _parity(p: tuple[int, ...]) -> int:
  inversions = sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j])
  return inversions % 2


@functools.lru_cache(maxsize=None)
def multiplication_table(group: str) -> np.ndarray:
  """table[a, b] = the id of the product a b (apply a, then b), int32 [|G|, |G|]."""
  parts = group.split("x")
  if len(parts) > 1:
    tables = [multiplication_table(p) for p in parts]
    out = tables[0]
    for t in tables[1:]:
      # Pair (a, b) has id a * |T| + b; products act componentwise.
      na, nb = len(out), len(t)
      out = (out[:, None, :, None] * nb + t[None, :, None, :]).reshape(na * nb, na * nb)
    return out.astype(np.int32)
  m = re.fullmatch(r"([SAZ])(\d+)", group)
  if not m:
    raise ValueError(f"word_problem: group={group!r} is not S<n>, A<n>, Z<n> or a product like "
                     f"'A4xZ5'")
  kind, n = m.group(1), int(m.group(2))
  if kind == "Z":
    if n < 1:
      raise ValueError(f"word_problem: Z{n} needs n >= 1")
    a = np.arange(n)
    return ((a[:, None] + a[None, :]) % n).astype(np.int32)
  if not 2 <= n <= 7:
    raise ValueError(f"word_problem: {group} needs 2 <= n <= 7 (the table has (n!)^2 entries)")
  return _permutation_group(n, even_only=kind == "A")


@dataclasses.dataclass
class WordProblem(SeededSynthetic):
  """Seeded group word-problem generator implementing the `Task` protocol (kind "lm")."""

  group: str = "S5"
  seq_len: int = 128
  seed: int = 0
  num_eval_examples: int = 1000
  eval_seq_len: int = 0          # 0: same as seq_len
  name: str = "word_problem"
  kind: str = "lm"
  num_classes: int = 0

  def __post_init__(self):
    self.table = multiplication_table(self.group)
    if self.seq_len < 1 or self.eval_seq_len < 0:
      raise ValueError(f"word_problem: seq_len must be >= 1 and eval_seq_len >= 0, got "
                       f"{self.seq_len}, {self.eval_seq_len}")

  @property
  def vocab_size(self) -> int:
    return len(self.table)

  def generate(self, rng: np.random.Generator, n: int, length: int | None = None) -> Batch:
    """`n` examples [n, length]: elements as inputs, running products as targets."""
    length = length or self.seq_len
    g = rng.integers(0, self.vocab_size, size=(n, length)).astype(np.int32)
    prefix = np.empty_like(g)
    state = np.zeros(n, np.int32)  # the identity
    for i in range(length):
      state = self.table[state, g[:, i]]
      prefix[:, i] = state
    return {"inputs": g, "targets": prefix, "loss_mask": np.ones((n, length), np.float32)}

  def eval_generate_kwargs(self) -> dict:
    return {"length": self.eval_seq_len or self.seq_len}
