"""SciFact (BEIR) claim -> abstract re-ranking of BM25's top 100 with a BPE cross-encoder.

BEIR SciFact has train and test queries but no dev split: a dev set of 10% of the train queries is
carved out by query id (see ssm_lab/data/ranking/splits.py). Hard negatives come from BM25's top 100
(bm25s, cached under the cache dir). The BPE tokenizer is trained on the corpus on first use. Same
cross-encoder and schedule as configs/rank_wikiqa.py, twice as wide (d_model 256, bf16), batch 32.

Sized for a GPU. Time per step: CPU: not measured; GPU: not measured.
"""

import os

import ml_collections

from ssm_lab.config import load_config


def get_config() -> ml_collections.ConfigDict:
  config = load_config(os.path.join(os.path.dirname(__file__), "rank_wikiqa.py"))
  config.task = ml_collections.ConfigDict(dict(
      name="ranking", dataset="beir-scifact", tokenizer="bpe:8192", seq_len=512, max_query_len=64,
      first_stage="bm25", rerank_depth=100, negatives_depth=100, group_size=4, dev_fraction=0.1,
      eval_split="dev", num_eval_examples=512, score_batch_size=64, seed=0, run_dir="",
      data_dir="", cache_dir=""))
  config.model.d_model = 256
  config.model.dtype = "bfloat16"
  config.train.batch_size = 32
  return config
