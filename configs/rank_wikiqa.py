"""WikiQA answer-sentence re-ranking with a byte-level cross-encoder (pointwise, 2 classes).

Each question's candidate sentences are re-ranked; eval reports MRR@10, nDCG@10, MAP and R@100 on
the dev questions next to BM25's (bm25_*) on the same questions. Training pairs each question with a
correct sentence and one of its incorrect ones (`group_size=2`).

Sized for a GPU. Time per step: CPU: not measured; GPU: not measured.
"""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="ranking", dataset="wikiqa", tokenizer="bytes", seq_len=256, max_query_len=96,
      group_size=2, eval_split="dev", num_eval_examples=512, score_batch_size=64, seed=0,
      run_dir="", data_dir="", cache_dir=""))
  m = config.model
  m.pattern = "MMMM"
  m.d_model = 128
  m.head = "classifier"
  m.num_classes = 0
  m.pooling = "last"
  t = config.train
  t.batch_size = 64
  t.num_steps = 3000
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.eval_every = 500
  t.checkpoint_every = 500
  return config
