"""Cross-encoder re-ranking as a classification task, evaluated with IR metrics.

Training examples are groups of one query with one relevant document (label 1) and `group_size - 1`
hard negatives (label 0): documents of the query's first-stage (BM25) top `negatives_depth` that are
not judged relevant (random documents when a query has none). Inputs are

  query tokens (at most max_query_len) <sep> document tokens (cut to fit) <eos>, then pad

[seq_len] with `pad_mask` 1 on the real tokens; with last-token pooling the model reads `<eos>`.
`train_batch(step, b)` draws groups from (seed, step) until b rows are filled (the last group may be
cut), so it is deterministic and resumes at the right place.

`loss` says how groups are trained. "pointwise" (default) is a 2-class classifier per row, trained by
`ssm_lab.train`'s cross-entropy. "lce" (localized contrastive estimation, RankMamba's recipe: softmax
cross-entropy over each group of 1 positive + group_size - 1 negatives) and "bce" (sigmoid
cross-entropy per row) score each row with one number (`num_classes` 1); their `kind` is
"group_ranking", whose loss `ssm_lab.train` computes group by group. Groups are consecutive rows, the
positive first, so batch sizes must be multiples of group_size.

`evaluate(score_fn)` re-ranks the first-stage top `rerank_depth` of every eval query by the model's
score (log-odds of class 1 for a 2-class head) and returns MRR@10, nDCG@10, MAP and R@100, plus the
same metrics of the first stage on the same queries; `run_dir` also writes each re-ranking as a TREC
run file. `eval_batches` is a fixed set of labelled examples from the eval queries (loss/accuracy).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ssm_lab.data.base import Batch
from ssm_lab.data.ranking.formats import Collection, Run, write_trec_run
from ssm_lab.data.ranking.metrics import NAMES, evaluate_run
from ssm_lab.data.ranking.splits import QuerySplits
from ssm_lab.data.tokenizer import Tokenizer


def model_scores(out: np.ndarray) -> np.ndarray:
  """One relevance score per row from model outputs: [n] or [n, 1] as is; [n, 2] the log-odds of
  class 1; [n, C] the expected class under the softmax (graded relevance)."""
  out = np.asarray(out, np.float64)
  if out.ndim == 1:
    return out
  if out.ndim == 2 and out.shape[1] == 1:
    return out[:, 0]
  if out.ndim == 2 and out.shape[1] == 2:
    return out[:, 1] - out[:, 0]
  if out.ndim == 2:
    z = out - out.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return p @ np.arange(out.shape[1])
  raise ValueError(f"score_fn must return [batch] or [batch, num_classes] outputs, got shape "
                   f"{out.shape}")


LOSSES = ("pointwise", "lce", "bce")


def encode_pair(query: np.ndarray, doc: np.ndarray, *, sep_id: int, eos_id: int, seq_len: int,
                max_query_len: int) -> np.ndarray:
  """`query[:max_query_len] <sep> document (cut to fit) <eos>`: at most seq_len token ids."""
  query = query[:max_query_len]
  doc = doc[:max(seq_len - len(query) - 2, 0)]
  return np.concatenate([query, [sep_id], doc, [eos_id]]).astype(np.int32)


def pack_pairs(queries: list[np.ndarray], docs: list[np.ndarray], *, tokenizer: Any, seq_len: int,
               max_query_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of (query, document) pairs as cross-encoder inputs [n, seq_len] int32 (pad-filled)
  and pad_mask [n, seq_len] float32 (1 on real tokens); each row is `encode_pair`'s layout."""
  inputs = np.full((len(queries), seq_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(queries), seq_len), np.float32)
  for row, (q, d) in enumerate(zip(queries, docs, strict=True)):
    seq = encode_pair(q, d, sep_id=tokenizer.sep_id, eos_id=tokenizer.eos_id, seq_len=seq_len,
                      max_query_len=max_query_len)
    inputs[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1.0
  return inputs, mask


class RankingTask:
  """Cross-encoder re-ranking: pointwise 2-class ("classification") or grouped ("group_ranking")."""

  def __init__(self, collection: Collection, tokenizer: Tokenizer, splits: QuerySplits,
               first_stage: Run, *, seq_len: int = 256, max_query_len: int = 64,
               eval_split: str = "dev", rerank_depth: int = 100, negatives_depth: int = 100,
               group_size: int = 2, rel: int = 1, seed: int = 0, num_eval_examples: int = 512,
               eval_queries: int = 0, score_batch_size: int = 64, run_dir: str = "",
               first_stage_name: str = "bm25", name: str = "ranking", loss: str = "pointwise"):
    if loss not in LOSSES:
      raise ValueError(f"ranking: loss={loss!r} must be one of {list(LOSSES)}")
    self.loss = loss
    self.kind = "classification" if loss == "pointwise" else "group_ranking"
    self.num_classes = 2 if loss == "pointwise" else 1
    if max_query_len < 1 or seq_len < max_query_len + 3:
      raise ValueError(f"ranking: need 1 <= max_query_len and seq_len >= max_query_len + 3 (sep, "
                       f"eos and one document token), got seq_len={seq_len}, "
                       f"max_query_len={max_query_len}")
    if group_size < 1 or rerank_depth < 1 or negatives_depth < 1 or score_batch_size < 1:
      raise ValueError(f"ranking: group_size, rerank_depth, negatives_depth and score_batch_size "
                       f"must be >= 1, got {group_size}, {rerank_depth}, {negatives_depth}, "
                       f"{score_batch_size}")
    self.name, self.collection, self.tokenizer = name, collection, tokenizer
    self.vocab_size, self.seq_len, self.max_query_len = tokenizer.vocab_size, seq_len, max_query_len
    self.splits, self.rel, self.seed = splits, rel, seed
    self.group_size, self.rerank_depth, self.negatives_depth = group_size, rerank_depth, negatives_depth
    self.score_batch_size, self.run_dir, self.first_stage_name = score_batch_size, run_dir, \
        first_stage_name
    self.eval_split = eval_split
    self.qrels = splits.qrels
    self.candidates = {q: [d for d, _ in sorted(ranked.items(), key=lambda kv: (-kv[1], kv[0]))]
                       for q, ranked in first_stage.items()}
    self._first_stage = first_stage
    self._doc_ids = list(collection.docs)
    self._qtok: dict[str, np.ndarray] = {}
    self._dtok: dict[str, np.ndarray] = {}
    self.train_qids = [q for q in splits.train if self._positives(q)]
    if not self.train_qids:
      raise ValueError(f"ranking: no training query has a document judged >= {rel}; "
                       f"protocol: {splits.protocol}")
    eval_qids = [q for q in splits.get(eval_split) if self._positives(q)]
    if eval_queries and eval_queries < len(eval_qids):
      eval_qids = eval_qids[:: math.ceil(len(eval_qids) / eval_queries)][:eval_queries]
    if not eval_qids:
      raise ValueError(f"ranking: the {eval_split!r} split has no query with a relevant document; "
                       f"protocol: {splits.protocol}")
    self.eval_qids = eval_qids
    self._eval_data = self._examples(np.random.default_rng([seed, 22]), self.eval_qids,
                                     num_eval_examples)
    self._first_stage_metrics: dict[str, float] | None = None
    self._evaluations = 0
    self.last_run: Run = {}

  # --- examples ------------------------------------------------------------------------------------

  def _positives(self, qid: str) -> list[str]:
    return sorted(d for d, g in self.qrels.get(qid, {}).items()
                  if g >= self.rel and d in self.collection.docs)

  def _negative_pool(self, qid: str) -> list[str]:
    judged = self.qrels.get(qid, {})
    return [d for d in self.candidates.get(qid, [])[: self.negatives_depth] if judged.get(d, 0) <= 0]

  def _tokens(self, ids: list[str], texts: dict[str, str], memo: dict[str, np.ndarray]):
    missing = list(dict.fromkeys(i for i in ids if i not in memo))
    if missing:
      for i, t in zip(missing, self.tokenizer.encode_batch([texts[i] for i in missing]), strict=True):
        memo[i] = t
    return [memo[i] for i in ids]

  def encode_pairs(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Cross-encoder inputs [n, seq_len] and pad_mask [n, seq_len] for (query id, doc id) pairs."""
    queries = self._tokens([q for q, _ in pairs], self.collection.queries, self._qtok)
    docs = self._tokens([d for _, d in pairs], self.collection.docs, self._dtok)
    return pack_pairs(queries, docs, tokenizer=self.tokenizer, seq_len=self.seq_len,
                      max_query_len=self.max_query_len)

  def _examples(self, rng: np.random.Generator, qids: list[str], n: int) -> Batch:
    pairs, labels = [], []
    while len(pairs) < n:
      q = qids[rng.integers(len(qids))]
      pos = self._positives(q)
      pairs.append((q, pos[rng.integers(len(pos))]))
      labels.append(1)
      pool = self._negative_pool(q)
      for _ in range(self.group_size - 1):
        if pool:
          d = pool[rng.integers(len(pool))]
        else:  # no first-stage negatives: a random document that is not judged relevant
          for _ in range(100):  # bounded: a collection could hold only relevant documents
            d = self._doc_ids[rng.integers(len(self._doc_ids))]
            if self.qrels.get(q, {}).get(d, 0) <= 0:
              break
        pairs.append((q, d))
        labels.append(0)
    pairs, labels = pairs[:n], labels[:n]
    inputs, mask = self.encode_pairs(pairs)
    return {"inputs": inputs, "labels": np.asarray(labels, np.int32), "pad_mask": mask}

  def save_artifacts(self, directory: str | Path) -> None:
    """The tokenizer as `<directory>/tokenizer.json`, so `ssm_lab.rank` scores from the workdir alone."""
    to_json = getattr(self.tokenizer, "to_json", None)
    if callable(to_json):
      Path(directory).mkdir(parents=True, exist_ok=True)
      (Path(directory) / "tokenizer.json").write_text(to_json(), encoding="utf-8")

  def train_batch(self, step: int, batch_size: int) -> Batch:
    return self._examples(np.random.default_rng([self.seed, 21, step]), self.train_qids, batch_size)

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    n = len(self._eval_data["labels"])
    if self.loss != "pointwise":  # whole groups only: a grouped loss reads rows group by group
      n -= n % self.group_size
      batch_size = max(self.group_size, batch_size - batch_size % self.group_size)
    for start in range(0, n, batch_size):
      yield {k: v[start:start + batch_size] for k, v in self._eval_data.items()}

  @property
  def first_stage(self) -> Run:
    """The first-stage run (every query of the collection, at depth max(rerank, negatives))."""
    return self._first_stage

  # --- ranking evaluation --------------------------------------------------------------------------

  def first_stage_metrics(self) -> dict[str, float]:
    """The first stage's metrics on the eval queries, its ranking cut at rerank_depth."""
    if self._first_stage_metrics is None:
      # The first stage's own scores: ties are then broken the same way as for any run (by
      # pytrec_eval), not by candidate order, which in some collections (WikiQA) leaks relevance.
      run = {q: {d: self._first_stage[q][d] for d in self.candidates.get(q, [])[:self.rerank_depth]}
             for q in self.eval_qids}
      self._first_stage_metrics = evaluate_run(run, self.qrels, self.rel, self.eval_qids)
    return self._first_stage_metrics

  def rerank(self, score_fn: Callable[[Batch], Any]) -> Run:
    """The eval queries' first-stage candidates scored by `score_fn` (fixed-size batches: the last
    one is filled by repeating its final row, whose extra scores are dropped)."""
    pairs = [(q, d) for q in self.eval_qids for d in self.candidates.get(q, [])[:self.rerank_depth]]
    run: Run = {q: {} for q in self.eval_qids}
    size = self.score_batch_size
    for start in range(0, len(pairs), size):
      chunk = pairs[start:start + size]
      inputs, mask = self.encode_pairs(chunk + [chunk[-1]] * (size - len(chunk)))
      scores = model_scores(score_fn({"inputs": inputs, "pad_mask": mask}))
      if len(scores) != size:
        raise ValueError(f"score_fn returned {len(scores)} scores for a batch of {size}")
      for (q, d), s in zip(chunk, scores[:len(chunk)], strict=True):
        run[q][d] = float(s)
    return run

  def evaluate(self, score_fn: Callable[[Batch], Any]) -> dict[str, float]:
    """MRR@10, nDCG@10, MAP, R@100 of the model's re-ranking, and `<first stage>_<metric>`."""
    run = self.rerank(score_fn)
    self.last_run = run
    out = {k: v for k, v in evaluate_run(run, self.qrels, self.rel, self.eval_qids).items()
           if k in NAMES}
    out.update({f"{self.first_stage_name}_{k}": v for k, v in self.first_stage_metrics().items()
                if k in NAMES})
    self._evaluations += 1
    if self.run_dir:
      write_trec_run(run, Path(self.run_dir) / f"{self.collection.name}-{self.eval_split}-"
                     f"{self._evaluations:04d}.trec", tag=self.name)
    return out
