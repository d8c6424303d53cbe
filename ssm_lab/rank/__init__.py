"""Cross-encoder re-ranking: scorers from ssm_lab workdirs or Hugging Face weights, re-ranking of TREC
runs, interpolation with the first stage, and the CLI
(`python -m ssm_lab.rank --help`)."""

from __future__ import annotations

from ssm_lab.rank.reranking import choose_weight, interpolate, metrics, rerank, top
from ssm_lab.rank.scorer import Scorer

__all__ = ["Scorer", "choose_weight", "interpolate", "metrics", "rerank", "top"]
