"""IR evaluation with ir-measures (pytrec_eval underneath): MRR@10, nDCG@10, MAP, Recall@100.

`rel` is the lowest grade that counts as relevant for the binary measures (MRR, MAP, Recall); nDCG
uses the graded judgements as gains. TREC DL convention: rel=2 for binary measures on its 0-3 scale.
Queries are averaged over those in both the run and the judgements, as pytrec_eval does; callers that
re-rank put every evaluated query in the run (an empty candidate list becomes a single dummy entry so
the query counts as 0 rather than disappearing).
"""

from __future__ import annotations

from typing import Any

import ir_measures
from ir_measures import AP, R, RR, nDCG

from ssm_lab.data.ranking.formats import Qrels, Run

NAMES = ("MRR@10", "nDCG@10", "MAP", "R@100")
NO_CANDIDATES = "__no_candidates__"


def measures(rel: int = 1) -> dict[str, Any]:
  """Our metric names -> ir-measures measures."""
  return {"MRR@10": RR(rel=rel) @ 10, "nDCG@10": nDCG @ 10, "MAP": AP(rel=rel),
          "R@100": R(rel=rel) @ 100}


def evaluate_run(run: Run, qrels: Qrels, rel: int = 1,
                 queries: list[str] | None = None) -> dict[str, float]:
  """Mean MRR@10, nDCG@10, MAP and R@100 of `run` over `queries` (default: all judged queries of
  the run), plus "num_queries".

  Raises:
    ValueError: none of the queries is judged.
  """
  qids = [q for q in (queries if queries is not None else run) if q in qrels]
  if not qids:
    raise ValueError(f"evaluate_run: no judged query among {len(queries or run)} run queries")
  sub_run = {q: (run.get(q) or {NO_CANDIDATES: 0.0}) for q in qids}
  sub_qrels = {q: qrels[q] for q in qids}
  m = measures(rel)
  agg = ir_measures.calc_aggregate(list(m.values()), sub_qrels, sub_run)
  out = {name: float(agg[measure]) for name, measure in m.items()}
  out["num_queries"] = float(len(qids))
  return out
