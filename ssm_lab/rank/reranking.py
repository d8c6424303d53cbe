"""Re-ranking a first-stage run with a `Scorer`, interpolating with the first stage, and metrics.

  rerank(scorer, queries, docs, run, depth=100)   -> Run of model scores (top `depth` per query)
  interpolate(model_run, first_stage, weight)      -> w * model + (1 - w) * first stage, each
                                                      min-max normalised per query
  choose_weight(model_run, first_stage, qrels)     -> the weight of a grid that is best on dev
  metrics(run, qrels, rel)                          -> MRR@10, nDCG@10, MAP, R@100 (ir-measures)
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import tqdm

from ssm_lab.data.ranking.formats import Qrels, Run
from ssm_lab.data.ranking.metrics import NAMES, evaluate_run
from ssm_lab.rank.scorer import Scorer

WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


def top(run: Run, depth: int) -> Run:
  """Each query's `depth` best documents (ties: doc id)."""
  return {q: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]) for q, d in run.items()}


def rerank(scorer: Scorer, queries: dict[str, str], docs: dict[str, str], run: Run, *,
           depth: int = 100, progress: bool = True, desc: str = "rerank") -> Run:
  """Model scores of every query's first-stage top `depth` (queries without text are skipped).

  Raises:
    KeyError: a run document with no text in `docs` (names the query and document).
  """
  cut = top({q: d for q, d in run.items() if q in queries}, depth)
  pairs, keys = [], []
  for q, ranked in cut.items():
    for d in ranked:
      if d not in docs:
        raise KeyError(f"run document {d!r} (query {q!r}) has no text in the corpus")
      pairs.append((queries[q], docs[d]))
      keys.append((q, d))
  out: Run = {q: {} for q in cut}
  size = scorer.batch_size
  bar = tqdm.tqdm(total=len(pairs), desc=desc, unit="pair", disable=not progress, leave=False)
  for start in range(0, len(pairs), size * 8):
    chunk = pairs[start:start + size * 8]
    for (q, d), s in zip(keys[start:start + len(chunk)], scorer.score(chunk), strict=True):
      out[q][d] = float(s)
    bar.update(len(chunk))
  bar.close()
  return out


def _normalised(scores: dict[str, float]) -> dict[str, float]:
  values = np.asarray(list(scores.values()), np.float64)
  lo, hi = (values.min(), values.max()) if len(values) else (0.0, 0.0)
  span = hi - lo
  return {d: (v - lo) / span if span > 0 else 0.0 for d, v in scores.items()}


def interpolate(model_run: Run, first_stage: Run, weight: float) -> Run:
  """w * model + (1 - w) * first stage over the model run's documents, both min-max normalised per
  query (a document the first stage lacks gets its normalised score 0)."""
  out: Run = {}
  for q, scores in model_run.items():
    m = _normalised(scores)
    f = _normalised({d: first_stage.get(q, {}).get(d, min(first_stage.get(q, {0: 0.0}).values()))
                     for d in scores})
    out[q] = {d: weight * m[d] + (1.0 - weight) * f[d] for d in scores}
  return out


def metrics(run: Run, qrels: Qrels, rel: int = 1, queries: Iterable[str] | None = None
            ) -> dict[str, float]:
  """MRR@10, nDCG@10, MAP, R@100 of `run` (see ssm_lab.data.ranking.metrics)."""
  out = evaluate_run(run, qrels, rel, list(queries) if queries is not None else None)
  return {k: out[k] for k in NAMES}


def choose_weight(model_run: Run, first_stage: Run, qrels: Qrels, *, rel: int = 1,
                  metric: str = "nDCG@10", weights: Iterable[float] = WEIGHTS) -> float:
  """The interpolation weight of `weights` with the best `metric` on these (dev) queries; ties go
  to the larger weight (more reranker)."""
  scored = [(metrics(interpolate(model_run, first_stage, w), qrels, rel)[metric], w) for w in weights]
  return max(scored)[1]
