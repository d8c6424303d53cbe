"""Vaswani (NPL) re-ranking of BM25's top 100, 5-fold cross-validation by query id (fold 0 here).

The collection has no training split: folds are fixed by query id (ssm_lab/data/ranking/splits.py);
run folds 0..4 and report the mean with the fold protocol. BM25 alone on all 93 queries is in
ssm_lab/data/README.md.
"""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="ranking", dataset="vaswani", tokenizer="bytes", seq_len=384, max_query_len=128,
      first_stage="bm25", rerank_depth=100, negatives_depth=100, group_size=4, num_folds=5,
      fold=0, eval_split="test", num_eval_examples=256, score_batch_size=64, seed=0, run_dir="",
      data_dir="", cache_dir=""))
  m = config.model
  m.pattern = "MMMM"
  m.d_model = 128
  m.head = "classifier"
  m.num_classes = 0
  m.pooling = "last"
  t = config.train
  t.batch_size = 32
  t.num_steps = 2000
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.eval_every = 500
  t.checkpoint_every = 500
  return config
