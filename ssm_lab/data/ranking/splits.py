"""Query-level splits: the collection's own, a dev set carved out of train, or k folds by query id.

Documents are shared between splits (they are a corpus); queries never are. Assignment is fixed by
query id alone: a query's place is the rank of sha256(query id) among the judged queries, so it does
not depend on file order or on a random seed, and the protocol can be stated with every number:

  - a collection with a "train" split: train = its judged queries, minus a dev set of
    `dev_fraction` of them when there is no "dev" split; test = "test" (else dev)
  - a collection without one (vaswani, TREC DL): `num_folds` folds over all judged queries by the rank
    above (rank mod num_folds); fold f is test, fold f + 1 (mod num_folds) dev, the rest train
"""

from __future__ import annotations

import dataclasses
import hashlib

from ssm_lab.data.ranking.formats import Collection, Qrels


@dataclasses.dataclass
class QuerySplits:
  train: list[str]
  dev: list[str]
  test: list[str]
  qrels: Qrels          # every judged query of the three splits
  protocol: str         # one line that says how the splits were made

  def get(self, name: str) -> list[str]:
    name = {"valid": "dev", "validation": "dev"}.get(name, name)
    if name not in ("train", "dev", "test"):
      raise ValueError(f"split {name!r} must be 'train', 'dev' or 'test'")
    return getattr(self, name)


def _order(qids) -> list[str]:
  return sorted(qids, key=lambda q: (hashlib.sha256(q.encode()).hexdigest(), q))


def query_folds(qids, num_folds: int) -> dict[str, int]:
  """Fold of each query id (see the module docstring)."""
  if num_folds < 2:
    raise ValueError(f"num_folds must be >= 2, got {num_folds}")
  return {q: i % num_folds for i, q in enumerate(_order(qids))}


def make_splits(collection: Collection, *, num_folds: int = 5, fold: int = 0,
                dev_fraction: float = 0.1, rel: int = 1) -> QuerySplits:
  """Train/dev/test query ids of `collection` (only queries with a judgement >= `rel`)."""
  def judged(split: str) -> list[str]:
    q = collection.qrels.get(split, {})
    return sorted(qid for qid, docs in q.items() if any(g >= rel for g in docs.values())
                  and qid in collection.queries)

  qrels: Qrels = {}
  for split_qrels in collection.qrels.values():
    for qid, docs in split_qrels.items():
      qrels.setdefault(qid, {}).update(docs)
  dev_name = next((s for s in ("dev", "valid", "validation") if s in collection.qrels), None)
  if "train" in collection.qrels:
    train = judged("train")
    if dev_name:
      dev, how = judged(dev_name), f"the collection's train/{dev_name}"
    else:
      if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
      ordered = _order(train)
      n_dev = max(1, round(dev_fraction * len(ordered)))
      dev = sorted(ordered[:n_dev])
      train = sorted(ordered[n_dev:])
      how = (f"train minus a dev set of {n_dev} queries (the first {dev_fraction:g} by sha256 of "
             f"the query id)")
    test = judged("test") if "test" in collection.qrels else list(dev)
    return QuerySplits(train, dev, test, qrels,
                       f"{how}; test = {'test' if 'test' in collection.qrels else dev_name}")
  if not 0 <= fold < num_folds:
    raise ValueError(f"fold={fold} must be in [0, num_folds={num_folds})")
  everything = sorted({q for s in collection.qrels for q in judged(s)})
  folds = query_folds(everything, num_folds)
  test = [q for q in everything if folds[q] == fold]
  dev = [q for q in everything if folds[q] == (fold + 1) % num_folds]
  train = [q for q in everything if folds[q] not in (fold, (fold + 1) % num_folds)]
  return QuerySplits(train, dev, test, qrels,
                     f"{num_folds}-fold by sha256 of the query id: test fold {fold}, dev fold "
                     f"{(fold + 1) % num_folds}, train the other {num_folds - 2}")
