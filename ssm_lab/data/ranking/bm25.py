"""First-stage retrieval with BM25 (bm25s), cached on disk.

Text is lower-cased, split into words of two or more word characters, and English stop words are
removed (bm25s's tokenizer; no stemmer is installed, so none is applied). Scoring defaults to the
Lucene variant with k1 = 0.9, b = 0.4 (Anserini/Pyserini's defaults):

  score(q, d) = sum over query terms t in d of  idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))
  idf(t)      = ln(1 + (N - df + 0.5) / (df + 0.5))

Cache: `<cache>/bm25/<dataset>-<collection hash>/<params>/` holds the index (bm25s format) and
`run-k<K>.trec`, the top-K documents of every query of the collection (documents with score 0 left
out); a later request for K' <= K reads that file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from ssm_lab.data import paths
from ssm_lab.data.ranking.formats import Collection, Run, read_trec_run, write_trec_run


@dataclasses.dataclass(frozen=True)
class BM25Params:
  k1: float = 0.9
  b: float = 0.4
  method: str = "lucene"
  stopwords: str = "en"

  def tag(self) -> str:
    return f"{self.method}-k1_{self.k1:g}-b_{self.b:g}-sw_{self.stopwords or 'none'}"


def tokenize(texts: list[str], params: BM25Params) -> list[list[str]]:
  import bm25s
  return bm25s.tokenize(texts, lower=True, stopwords=params.stopwords or None,
                        show_progress=False, return_ids=False)


class BM25Index:
  """A BM25 index over documents `doc_ids` (parallel to the texts it was built from)."""

  def __init__(self, retriever, doc_ids: list[str], params: BM25Params):
    self.retriever, self.doc_ids, self.params = retriever, doc_ids, params
    self._row = {d: i for i, d in enumerate(doc_ids)}

  @classmethod
  def build(cls, doc_ids: list[str], texts: list[str], params: BM25Params) -> "BM25Index":
    import bm25s
    retriever = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
    retriever.index(tokenize(texts, params), show_progress=False)
    return cls(retriever, list(doc_ids), params)

  def save(self, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    self.retriever.save(str(folder), show_progress=False)
    (folder / "doc_ids.txt").write_text("\n".join(self.doc_ids) + "\n", encoding="utf-8")

  @classmethod
  def load(cls, folder: Path, params: BM25Params) -> "BM25Index":
    import bm25s
    retriever = bm25s.BM25.load(str(folder), show_progress=False)
    doc_ids = (folder / "doc_ids.txt").read_text(encoding="utf-8").splitlines()
    return cls(retriever, doc_ids, params)

  def search(self, queries: dict[str, str], k: int) -> Run:
    """The top-k documents of every query (score > 0 only)."""
    qids = list(queries)
    if not qids:
      return {}
    k = min(k, len(self.doc_ids))
    rows, scores = self.retriever.retrieve(tokenize([queries[q] for q in qids], self.params), k=k,
                                           show_progress=False)
    run: Run = {}
    for qid, r, s in zip(qids, rows, scores, strict=True):
      run[qid] = {self.doc_ids[i]: float(v) for i, v in zip(r, s, strict=True) if v > 0}
    return run

  def score(self, query: str, doc_ids: list[str]) -> np.ndarray:
    """BM25 scores of `query` for the given documents [len(doc_ids)]."""
    terms = tokenize([query], self.params)[0]
    all_scores = self.retriever.get_scores(terms) if terms else np.zeros(len(self.doc_ids))
    return np.asarray([all_scores[self._row[d]] for d in doc_ids], np.float64)


def _folder(collection: Collection, params: BM25Params, cache_dir: str) -> Path:
  return (paths.cache_root(cache_dir) / "bm25" / f"{collection.name}-{collection.fingerprint()}"
          / params.tag())


def get_index(collection: Collection, params: BM25Params, cache_dir: str = "") -> BM25Index:
  """The collection's BM25 index, loaded from the cache or built and saved there."""
  folder = _folder(collection, params, cache_dir) / "index"
  if (folder / "doc_ids.txt").is_file():
    return BM25Index.load(folder, params)
  ids = list(collection.docs)
  index = BM25Index.build(ids, [collection.docs[d] for d in ids], params)
  tmp = folder.with_name(f"index.tmp-{id(index)}")
  index.save(tmp)
  if not folder.exists():
    tmp.rename(folder)
  return index


DEFAULT_PARAMS = BM25Params()


def first_stage_run(collection: Collection, k: int, params: BM25Params = DEFAULT_PARAMS,
                    cache_dir: str = "") -> Run:
  """BM25's top-k for every query of the collection; for collections whose queries come with their
  own candidate lists (WikiQA), BM25 scores of exactly those candidates instead. Cached."""
  folder = _folder(collection, params, cache_dir)
  cached = _cached_run(folder, k)
  if cached is not None:
    return cached
  index = get_index(collection, params, cache_dir)
  if collection.candidates:
    run = {}
    for split_cands in collection.candidates.values():
      for qid, cands in split_cands.items():
        scores = index.score(collection.queries[qid], cands)
        run[qid] = {d: float(s) for d, s in zip(cands, scores, strict=True)}
  else:
    run = index.search(collection.queries, k)
  write_trec_run(run, folder / f"run-k{k}.trec", tag=f"bm25-{params.tag()}")
  # What the file holds (6 decimals), so a first and a cached call return the same run.
  return _cached_run(folder, k)


def _cached_run(folder: Path, k: int) -> Run | None:
  """The smallest cached run of depth >= k, cut to k per query; None if there is none."""
  cached = []
  if folder.is_dir():
    for p in folder.glob("run-k*.trec"):
      m = re.fullmatch(r"run-k(\d+)\.trec", p.name)
      if m and int(m.group(1)) >= k:
        cached.append((int(m.group(1)), p))
  if not cached:
    return None
  run = read_trec_run(min(cached)[1])
  return {q: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:k]) for q, d in run.items()}
