"""Ranking collections (BEIR, MS MARCO, TREC, WikiQA), BM25, IR metrics and the re-ranking task."""

from __future__ import annotations

from ssm_lab.data.ranking import bm25
from ssm_lab.data.ranking.formats import Collection, load_collection
from ssm_lab.data.ranking.splits import make_splits
from ssm_lab.data.ranking.task import RankingTask
from ssm_lab.data.tokenizer import load_tokenizer

DEFAULT_BPE_TRAIN_BYTES = 32 << 20


def build_ranking_task(dataset: str, *, data_dir: str = "", cache_dir: str = "", layout: str = "auto",
                       topic_field: str = "title", tokenizer: str = "bytes",
                       bpe_train_bytes: int = DEFAULT_BPE_TRAIN_BYTES, seq_len: int = 256,
                       max_query_len: int = 64, first_stage: str = "bm25", bm25_k1: float = 0.9,
                       bm25_b: float = 0.4, rerank_depth: int = 100, negatives_depth: int = 100,
                       group_size: int = 2, rel_threshold: int = 1, num_folds: int = 5,
                       fold: int = 0, dev_fraction: float = 0.1, eval_split: str = "dev",
                       eval_queries: int = 0, num_eval_examples: int = 512,
                       score_batch_size: int = 64, run_dir: str = "", seed: int = 0,
                       loss: str = "pointwise", progress: bool = True) -> RankingTask:
  """A `RankingTask` over `dataset` (see ssm_lab/data/ranking/task.py and README.md).

  `loss` is "pointwise" (2-class rows, trained by ssm_lab.train), "lce" or "bce" (scalar scores,
  trained by ssm_lab.train, kind "group_ranking"). `first_stage` is "bm25" (bm25s over the whole collection, cached) or the name of a run file that
  comes with the collection (for example "bm25_top100" of msmarco-trec-dl20).
  """
  collection = load_collection(dataset, data_dir, layout, topic_field)
  splits = make_splits(collection, num_folds=num_folds, fold=fold, dev_fraction=dev_fraction,
                       rel=rel_threshold)
  depth = max(rerank_depth, negatives_depth)
  if first_stage == "bm25":
    run = bm25.first_stage_run(collection, depth, bm25.BM25Params(k1=bm25_k1, b=bm25_b),
                               cache_dir)
  elif first_stage in collection.runs:
    run = collection.runs[first_stage]
  else:
    raise ValueError(f"first_stage={first_stage!r} is neither 'bm25' nor a run of {collection.root} "
                     f"(runs there: {sorted(collection.runs)})")
  tok = load_tokenizer(tokenizer, cache_dir=cache_dir, data_dir=data_dir,
                       dataset_key=collection.name,
                       train_texts=lambda: iter(collection.docs.values()),
                       bpe_train_bytes=bpe_train_bytes, show_progress=progress)
  return RankingTask(collection, tok, splits, run, seq_len=seq_len, max_query_len=max_query_len,
                     eval_split=eval_split, rerank_depth=rerank_depth,
                     negatives_depth=negatives_depth, group_size=group_size, rel=rel_threshold,
                     seed=seed, num_eval_examples=num_eval_examples, eval_queries=eval_queries,
                     score_batch_size=score_batch_size, run_dir=run_dir,
                     first_stage_name=first_stage, name=f"ranking:{collection.name}", loss=loss)


__all__ = ["Collection", "RankingTask", "bm25", "build_ranking_task", "load_collection",
           "make_splits"]
