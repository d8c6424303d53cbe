"""Vaswani (NPL) re-ranking of BM25's top 100, 5-fold cross-validation by query id (fold 0 here).

The collection has no training split: folds are fixed by query id (ssm_lab/data/ranking/splits.py);
run folds 0..4 and report the mean with the fold protocol. BM25 alone on all 93 queries is in
ssm_lab/data/README.md. Same cross-encoder and schedule as configs/rank_wikiqa.py, batch 32 for
2000 steps.

Sized for a GPU. Time per step: CPU: not measured; GPU: not measured.
"""

import os

import ml_collections

from ssm_lab.config import load_config


def get_config() -> ml_collections.ConfigDict:
  config = load_config(os.path.join(os.path.dirname(__file__), "rank_wikiqa.py"))
  config.task = ml_collections.ConfigDict(dict(
      name="ranking", dataset="vaswani", tokenizer="bytes", seq_len=384, max_query_len=128,
      first_stage="bm25", rerank_depth=100, negatives_depth=100, group_size=4, num_folds=5,
      fold=0, eval_split="test", num_eval_examples=256, score_batch_size=64, seed=0, run_dir="",
      data_dir="", cache_dir=""))
  config.train.batch_size = 32
  config.train.num_steps = 2000
  return config
