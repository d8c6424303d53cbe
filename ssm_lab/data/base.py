"""The contract between data and the training loop.

A task is anything `ssm_lab.train` can train and evaluate on. Batches are dicts of NumPy arrays:

  kind "lm" (next-token prediction; synthetic tasks and corpora):
    inputs      int32   [batch, length]  token ids fed to the model
    targets     int32   [batch, length]  the token to predict at each position
    loss_mask   float32 [batch, length]  1 where the position counts in loss and accuracy
    segment_ids int32   [batch, length]  optional: document index of packed sequences (attention
                                         does not cross segments)
    positions   int32   [batch, length]  optional: position within the document (RoPE)
  kind "classification" (cross-encoder ranking, sequence classification):
    inputs      int32   [batch, length];  labels int32 [batch];  pad_mask float32 [batch, length]
    (1 on real tokens; pooling reads it)

`train_batch(step, batch_size)` is a pure function of (task seed, step): the data position of a run is
its step, so a resumed run continues with the next batch, not the first, without saving iterators.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np

Batch = dict[str, np.ndarray]


@runtime_checkable
class Task(Protocol):
  """What `ssm_lab.train` needs from a dataset or synthetic task."""

  name: str
  kind: str           # "lm" or "classification"
  vocab_size: int     # size of the token vocabulary the model must embed
  seq_len: int        # length of `inputs`
  num_classes: int    # classification only (0 for lm)

  def train_batch(self, step: int, batch_size: int) -> Batch:
    """The batch for training step `step`: deterministic in (seed, step)."""

  def eval_batches(self, batch_size: int) -> Iterable[Batch]:
    """A fixed evaluation set (the same batches at every evaluation)."""


class SeededSynthetic:
  """`train_batch` and `eval_batches` for tasks that draw examples with `generate(rng, n, **kw)`.

  Step s draws from `default_rng([seed, 1, s])`, so batches are a pure function of (seed, step); the
  evaluation set is one fixed draw from `default_rng([seed, 2])`, sliced into batches.
  Subclasses set `seed` and `num_eval_examples`, and may override `eval_generate_kwargs`.
  """

  seed: int
  num_eval_examples: int

  def generate(self, rng: np.random.Generator, n: int, **kw: Any) -> Batch:
    raise NotImplementedError

  def eval_generate_kwargs(self) -> dict[str, Any]:
    """Extra arguments for the evaluation draw (for example another sequence length)."""
    return {}

  def train_batch(self, step: int, batch_size: int) -> Batch:
    return self.generate(np.random.default_rng([self.seed, 1, step]), batch_size)

  def eval_batches(self, batch_size: int) -> Iterable[Batch]:
    data = self.generate(np.random.default_rng([self.seed, 2]), self.num_eval_examples,
                         **self.eval_generate_kwargs())
    for start in range(0, self.num_eval_examples, batch_size):
      yield {k: v[start:start + batch_size] for k, v in data.items()}


def optional_hooks(task: Any) -> dict[str, Callable[..., Any]]:
  """Optional task hooks the loop uses when present.

  - `eval_summary(totals: dict[str, float]) -> dict[str, float]`: extra eval scalars from the summed
    totals {"loss_sum", "correct", "count"} (for example perplexity, bits per byte).
  - `evaluate(score_fn) -> dict[str, float]`: a task-specific evaluation (ranking metrics), given
    `score_fn(batch) -> np.ndarray` of model outputs.
  """
  return {name: getattr(task, name) for name in ("eval_summary", "evaluate")
          if callable(getattr(task, name, None))}
