"""SciFact (BEIR) claim -> abstract re-ranking of BM25's top 100 with a BPE cross-encoder.

BEIR SciFact has train and test queries but no dev split: a dev set of 10% of the train queries is
carved out by query id (see ssm_lab/data/ranking/splits.py). Hard negatives come from BM25's top 100
(bm25s, cached under the cache dir). The BPE tokenizer is trained on the corpus on first use.
"""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="ranking", dataset="beir-scifact", tokenizer="bpe:8192", seq_len=512, max_query_len=64,
      first_stage="bm25", rerank_depth=100, negatives_depth=100, group_size=4, dev_fraction=0.1,
      eval_split="dev", num_eval_examples=512, score_batch_size=64, seed=0, run_dir="",
      data_dir="", cache_dir=""))
  m = config.model
  m.pattern = "MMMM"
  m.d_model = 256
  m.head = "classifier"
  m.num_classes = 0
  m.pooling = "last"
  m.dtype = "bfloat16"
  t = config.train
  t.batch_size = 32
  t.num_steps = 3000
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.eval_every = 500
  t.checkpoint_every = 500
  return config
