"""Ranking collections in every layout, query splits, BM25 and IR metrics against hand-computed
values, and the re-ranking task (batches, determinism, evaluate)."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from ssm_lab.data.ranking import bm25, build_ranking_task, formats, metrics, splits
from ssm_lab.data.ranking.task import model_scores

DOCS = {
    "d1": "the cat sat on the mat", "d2": "dogs are great pets", "d3": "a cat and a dog",
    "d4": "cats cats cats", "d5": "a quiet mat for a dog", "d6": "great grey whales",
    "d7": "whales sing songs", "d8": "the dog chased the cat", "d9": "songs about pets",
}
QUERIES = {"q1": "cat dog", "q2": "whales songs", "q3": "pets", "q4": "mat", "q5": "grey cats",
           "q6": "dog pets"}
TRAIN = {"q1": {"d3": 1, "d8": 2, "d2": 0}, "q2": {"d7": 1}, "q3": {"d2": 1, "d9": 1},
         "q4": {"d1": 1, "d5": 1}}
TEST = {"q5": {"d6": 1, "d4": 1}, "q6": {"d2": 1}}


def write_beir(root, gz=False):
  root.mkdir(parents=True)
  op = gzip.open if gz else open
  with op(root / ("corpus.jsonl.gz" if gz else "corpus.jsonl"), "wt", encoding="utf-8") as f:
    for i, t in DOCS.items():
      f.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
  with open(root / "queries.jsonl", "w") as f:
    for i, t in QUERIES.items():
      f.write(json.dumps({"_id": i, "text": t}) + "\n")
  (root / "qrels").mkdir()
  for split, q in (("train", TRAIN), ("test", TEST)):
    lines = ["query-id\tcorpus-id\tscore"] + [f"{a}\t{d}\t{g}" for a, ds in q.items()
                                              for d, g in ds.items()]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def test_beir_layout(dirs):
  data, _ = dirs
  write_beir(data / "toy", gz=True)
  (data / "toy" / "first.trec").write_text("q1 Q0 d3 1 2.5 x\nq1 Q0 d1 2 1.0 x\n")
  c = formats.load_collection("toy")
  assert c.layout == "beir" and c.docs == DOCS and c.queries == QUERIES
  assert c.qrels == {"train": TRAIN, "test": TEST} and c.splits == ["train", "test"]
  assert c.runs == {"first": {"q1": {"d3": 2.5, "d1": 1.0}}}


def test_msmarco_layout(dirs):
  data, _ = dirs
  root = data / "mm"
  root.mkdir()
  (root / "collection.tsv").write_text("".join(f"{i}\t{t}\n" for i, t in DOCS.items()))
  (root / "queries.dev.tsv").write_text("q1\tcat dog\nq2\twhales songs\n")
  (root / "qrels.dev.tsv").write_text("q1\t0\td3\t1\nq2 0 d7 1\n")
  (root / "run.dev.tsv").write_text("q1\td8\t1\nq1\td3\t2\n")
  (root / "top1000.dev.tsv").write_text("q9\tx1\tnew query\tnew passage\nq9\td1\tnew query\t"
                                        "the cat sat on the mat\n")
  c = formats.load_collection("mm")
  assert c.layout == "msmarco" and c.qrels == {"dev": {"q1": {"d3": 1}, "q2": {"d7": 1}}}
  assert c.runs["run.dev"] == {"q1": {"d8": -1.0, "d3": -2.0}}
  assert c.runs["top1000.dev"] == {"q9": {"x1": -1.0, "d1": -2.0}}
  assert c.queries["q9"] == "new query" and c.docs["x1"] == "new passage"
  assert len(c.docs) == len(DOCS) + 1


def test_trec_layout_old_and_new_topics(dirs):
  data, _ = dirs
  root = data / "tr"
  root.mkdir()
  (root / "docs.sgml").write_text(
      "<DOC>\n<DOCNO> D1 </DOCNO>\n<TEXT>the cat\nsat</TEXT>\n</DOC>\n"
      "<DOC><DOCNO>D2</DOCNO> dogs <B>bark</B> </DOC>\n")
  (root / "topics.new").write_text("<top>\n<num>7</num><title>\nCAT FACTS\n</title>\n</top>\n")
  (root / "topics.old").write_text(
      "<top>\n<num> Number: 301\n<title> International Organized Crime\n\n<desc> Description:\n"
      "Identify organizations.\n<narr> Narrative:\nA relevant document...\n</top>\n")
  (root / "qrels.train.txt").write_text("7 0 D1 1\n301 0 D2 0\n")
  (root / "qrels").write_text("301 0 D1 2\n")
  (root / "bm25.run").write_text("7 Q0 D1 1 3.0 t\n7 Q0 D2 2 1.0 t\n")
  c = formats.load_collection("tr")
  assert c.layout == "trec" and c.docs == {"D1": "the cat sat", "D2": "dogs bark"}
  assert c.queries == {"7": "CAT FACTS", "301": "International Organized Crime"}
  assert c.qrels == {"train": {"7": {"D1": 1}, "301": {"D2": 0}}, "test": {"301": {"D1": 2}}}
  assert c.runs == {"bm25": {"7": {"D1": 3.0, "D2": 1.0}}}
  desc = formats.read_trec_topics(root / "topics.old", "desc")
  assert desc == {"301": "Identify organizations."}


def test_wikiqa_layout(dirs):
  data, _ = dirs
  for split, rows in (("train", [("q a ?", "s1", "1", "1"), ("q a ?", "s2", "1", "0"),
                                 ("q b ?", "s3", "2", "0"), ("q b ?", "s4", "2", "1")]),
                      ("dev", [("q c ?", "s5", "1", "1")])):
    folder = data / "wq" / split
    folder.mkdir(parents=True)
    for name, col in zip(("a.toks", "b.toks", "id.txt", "sim.txt"), zip(*rows, strict=True), strict=True):
      (folder / name).write_text("\n".join(col) + "\n")
  c = formats.load_collection("wq")
  assert c.layout == "wikiqa"
  assert c.queries == {"train-1": "q a ?", "train-2": "q b ?", "dev-1": "q c ?"}
  assert c.qrels["train"] == {"train-1": {"train-1-0": 1, "train-1-1": 0},
                              "train-2": {"train-2-0": 0, "train-2-1": 1}}
  assert c.candidates["train"]["train-2"] == ["train-2-0", "train-2-1"]
  assert c.docs["train-2-1"] == "s4"
  (data / "wq" / "dev" / "sim.txt").write_text("2\n")
  with pytest.raises(ValueError, match=r"dev/sim\.txt:1: label '2' is not 0 or 1"):
    formats.load_collection("wq")


@pytest.mark.parametrize("name,content,reader,match", [
    ("corpus.jsonl", '{"_id": "1", "text": "a"}\n{"_id": "2", "text": \n', "beir_docs",
     r"corpus\.jsonl:2: not valid JSON"),
    ("corpus.jsonl", '{"_id": "1", "body": "a"}\n', "beir_docs", r"corpus\.jsonl:1: expected"),
    ("q.tsv", "1\t0\td1\t1\n2\td2\t1\n\n3 x\n", "qrels",
     r"q\.tsv:4: expected 'qid iter docid grade'"),
    ("q.tsv", "1\t0\td1\tmaybe\n", "qrels", r"q\.tsv:1: relevance grade 'maybe'"),
    ("r.trec", "1 Q0 d1 1 2.0 t\n1 Q0 d2 2 t\n", "run", r"r\.trec:2: expected 'qid Q0"),
    ("r.trec", "1 Q0 d1 1 high t\n", "run", r"r\.trec:1: score 'high'"),
    ("c.tsv", "1\tok\n2 no tab\n", "tsv", r"c\.tsv:2: expected 'id<TAB>text'"),
    ("d.sgml", "<DOC>\n<DOCNO>1</DOCNO>\n<DOC>\n", "sgml", r"d\.sgml:3: <DOC> opened before"),
    ("d.sgml", "<DOC>\nno number\n</DOC>\n", "sgml", r"d\.sgml:1: document without <DOCNO>"),
    ("t.txt", "<top><title>x</title></top>\n", "topics", r"t\.txt:1: topic without <num>"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, reader, match):
  p = tmp_path / name
  p.write_text(content)
  fn = {"beir_docs": lambda: formats.read_jsonl_records(p, "_id", ("title", "text")),
        "qrels": lambda: formats.read_qrels(p), "run": lambda: formats.read_trec_run(p),
        "tsv": lambda: formats.read_tsv_pairs(p), "sgml": lambda: formats.read_trec_docs(p),
        "topics": lambda: formats.read_trec_topics(p)}[reader]
  with pytest.raises(ValueError, match=match):
    fn()


def test_unknown_layout_and_dataset_errors(dirs):
  data, _ = dirs
  (data / "junk").mkdir()
  (data / "junk" / "notes.csv").write_text("x")
  with pytest.raises(ValueError, match=r"not a ranking collection.*notes\.csv"):
    formats.load_collection("junk")
  with pytest.raises(ValueError, match=r"dataset 'nope' not found.*available: \['junk'\]"):
    formats.load_collection("nope")


def test_query_folds_fixed_by_id_and_dev_carving(dirs):
  data, _ = dirs
  write_beir(data / "toy")
  c = formats.load_collection("toy")
  sp = splits.make_splits(c, dev_fraction=0.25)
  assert sorted(sp.train + sp.dev) == ["q1", "q2", "q3", "q4"] and len(sp.dev) == 1
  assert sp.test == ["q5", "q6"] and "dev set" in sp.protocol
  qids = [f"q{i}" for i in range(50)]
  folds = splits.query_folds(qids, 5)
  assert folds == splits.query_folds(list(reversed(qids)), 5)        # order-independent
  assert sorted(np.bincount(list(folds.values()))) == [10] * 5
  del c.qrels["train"]                                                  # no training split
  seen = []
  for f in range(3):
    sp = splits.make_splits(c, num_folds=3, fold=f)
    assert not set(sp.train) & set(sp.test) and not set(sp.dev) & set(sp.test)
    assert sorted(sp.train + sp.dev + sp.test) == ["q5", "q6"]
    seen += sp.test
  assert sorted(seen) == ["q5", "q6"]                                   # each query tested once


def _hand_bm25(query, doc, docs, k1=0.9, b=0.4):
  stop = {"the", "on", "are", "a", "and", "for"}  # the stop words among these texts
  tok = lambda s: [w for w in s.lower().split() if w not in stop and len(w) > 1]  # noqa: E731
  corpus = [tok(d) for d in docs]
  avgdl = sum(map(len, corpus)) / len(corpus)
  d = tok(doc)
  score = 0.0
  for t in set(tok(query)):
    df = sum(t in c for c in corpus)
    if not df or t not in d:
      continue
    idf = math.log(1 + (len(corpus) - df + 0.5) / (df + 0.5))
    tf = d.count(t)
    score += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
  return score


def test_bm25_matches_the_formula_and_is_cached(dirs, monkeypatch):
  data, cache = dirs
  write_beir(data / "toy")
  c = formats.load_collection("toy")
  run = bm25.first_stage_run(c, k=5)
  docs = list(DOCS.values())
  for qid, q in QUERIES.items():
    expect = {d: _hand_bm25(q, t, docs) for d, t in DOCS.items()}
    top = sorted((s for s in expect.values() if s > 0), reverse=True)[:5]
    assert sorted(run[qid].values(), reverse=True) == pytest.approx(top, rel=1e-5)
    for d, s in run[qid].items():
      assert s == pytest.approx(expect[d], rel=1e-5)
  assert list((cache / "bm25").rglob("run-k5.trec"))
  monkeypatch.setattr(bm25.BM25Index, "build", lambda *a, **k: pytest.fail("rebuilt"))
  assert bm25.first_stage_run(c, k=3) == {q: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
                                          for q, d in run.items()}


def test_metrics_against_hand_computed_values(tmp_path):
  qrels = {"q1": {"a": 1, "b": 0, "c": 2, "d": 1}, "q2": {"e": 1}, "q3": {"z": 1}}
  run = {"q1": {"a": 0.9, "x": 0.8, "c": 0.7, "b": 0.6}, "q2": {"f": 0.5, "g": 0.4, "e": 0.3}}
  m = metrics.evaluate_run(run, qrels, rel=1, queries=["q1", "q2"])
  idcg1 = 2 + 1 / math.log2(3) + 1 / math.log2(4)
  assert m["MRR@10"] == pytest.approx((1 + 1 / 3) / 2)
  assert m["MAP"] == pytest.approx(((1 + 2 / 3) / 3 + 1 / 3) / 2)
  assert m["R@100"] == pytest.approx((2 / 3 + 1) / 2)
  assert m["nDCG@10"] == pytest.approx((2 / idcg1 + 0.5) / 2)
  strict = metrics.evaluate_run(run, qrels, rel=2, queries=["q1"])
  assert strict["MRR@10"] == pytest.approx(1 / 3) and strict["R@100"] == 1.0
  # A judged query without candidates counts as zero instead of vanishing from the mean.
  m3 = metrics.evaluate_run(run, qrels, rel=1, queries=["q1", "q2", "q3"])
  assert m3["num_queries"] == 3 and m3["MRR@10"] == pytest.approx((1 + 1 / 3) / 3)
  formats.write_trec_run(run, tmp_path / "r.trec", tag="t")
  assert formats.read_trec_run(tmp_path / "r.trec") == run
  first = (tmp_path / "r.trec").read_text().splitlines()[0].split()
  assert first == ["q1", "Q0", "a", "1", "0.900000", "t"]


def test_model_scores_conversions():
  assert np.allclose(model_scores(np.array([[0.0, 2.0], [1.0, 0.0]])), [2.0, -1.0])
  assert np.allclose(model_scores(np.array([[3.0], [4.0]])), [3.0, 4.0])
  assert np.allclose(model_scores(np.array([[0.0, 0.0, 50.0]])), [2.0])
  with pytest.raises(ValueError, match="shape"):
    model_scores(np.zeros((2, 3, 4)))


@pytest.fixture
def task(dirs):
  data, _ = dirs
  write_beir(data / "toy")
  return build_ranking_task("toy", seq_len=48, max_query_len=16, rerank_depth=5, negatives_depth=5,
                            group_size=3, dev_fraction=0.25, eval_split="test",
                            num_eval_examples=6, score_batch_size=4, progress=False)


def test_training_batches(task):
  b = task.train_batch(0, 7)
  assert b["inputs"].shape == (7, 48) and b["pad_mask"].shape == (7, 48)
  assert b["labels"].tolist() == [1, 0, 0, 1, 0, 0, 1]           # groups of 1 + 2, last cut
  tok = task.tokenizer
  for x, m, y in zip(b["inputs"], b["pad_mask"], b["labels"], strict=True):
    n = int(m.sum())
    assert (m[:n] == 1).all() and (x[n:] == tok.pad_id).all() and x[n - 1] == tok.eos_id
    sep = int(np.flatnonzero(x == tok.sep_id)[0])
    query, doc = tok.decode(x[:sep]), tok.decode(x[sep + 1:n - 1])
    qid = next(q for q, t in QUERIES.items() if t == query)
    did = next(d for d, t in DOCS.items() if t == doc)
    assert qid in task.train_qids
    assert (task.qrels[qid].get(did, 0) >= 1) == bool(y)
  again = task.train_batch(0, 7)
  assert all(np.array_equal(b[k], again[k]) for k in b)
  assert not np.array_equal(task.train_batch(1, 7)["inputs"], b["inputs"])
  assert task.train_batch(0, 1)["labels"].tolist() == [1]
  evals = list(task.eval_batches(4))
  assert [len(e["labels"]) for e in evals] == [4, 2]


def test_long_inputs_are_truncated(task):
  task.collection.docs["d1"] = "word " * 200
  task.collection.queries["q4"] = "query " * 50
  task._dtok.clear()
  task._qtok.clear()
  x, m = task.encode_pairs([("q4", "d1")])
  assert m.sum() == 48 and x[0, 16] == task.tokenizer.sep_id and x[0, -1] == task.tokenizer.eos_id


def _oracle(task):
  by_text = {t: d for d, t in DOCS.items()}

  def score(batch):
    assert batch["inputs"].shape == (4, 48)                      # fixed-size batches
    out = []
    for x, m in zip(batch["inputs"], batch["pad_mask"], strict=True):
      n = int(m.sum())
      sep = int(np.flatnonzero(x == task.tokenizer.sep_id)[0])
      q = next(q for q, t in QUERIES.items() if t == task.tokenizer.decode(x[:sep]))
      d = by_text[task.tokenizer.decode(x[sep + 1:n - 1])]
      out.append([0.0, float(task.qrels[q].get(d, 0))])
    return np.asarray(out)
  return score


def test_evaluate_reranks_and_writes_runs(task, tmp_path):
  task.run_dir = str(tmp_path / "runs")
  got = task.evaluate(_oracle(task))
  # The oracle puts every relevant candidate first: perfect MRR; MAP/recall limited by candidates.
  assert got["MRR@10"] == 1.0
  fs = task.first_stage_metrics()
  assert got["R@100"] == fs["R@100"] and got["MAP"] >= fs["MAP"]
  assert got["bm25_nDCG@10"] == fs["nDCG@10"]
  files = list((tmp_path / "runs").glob("*.trec"))
  assert len(files) == 1 and formats.read_trec_run(files[0]) == task.last_run
  # Scoring with the first stage's own scores reproduces the first stage's metrics.
  first = task._first_stage
  lookup = {(QUERIES[q], DOCS[d]): s for q, ds in first.items() for d, s in ds.items()}

  def bm25_score(batch):
    out = []
    for x, m in zip(batch["inputs"], batch["pad_mask"], strict=True):
      n, sep = int(m.sum()), int(np.flatnonzero(x == task.tokenizer.sep_id)[0])
      out.append(lookup[(task.tokenizer.decode(x[:sep]), task.tokenizer.decode(x[sep + 1:n - 1]))])
    return np.asarray(out)
  again = task.evaluate(bm25_score)
  for k in metrics.NAMES:
    assert again[k] == pytest.approx(fs[k])


def test_provided_run_as_first_stage_and_errors(dirs):
  data, _ = dirs
  write_beir(data / "toy")
  (data / "toy" / "given.trec").write_text("q5 Q0 d6 1 2.0 x\nq5 Q0 d1 2 1.0 x\nq6 Q0 d2 1 1.0 x\n"
                                           "q1 Q0 d3 1 1 x\nq2 Q0 d7 1 1 x\nq3 Q0 d9 1 1 x\n"
                                           "q4 Q0 d5 1 1 x\n")
  t = build_ranking_task("toy", first_stage="given", eval_split="test", seq_len=32,
                         max_query_len=8, progress=False)
  assert t.candidates["q5"] == ["d6", "d1"]
  with pytest.raises(ValueError, match=r"first_stage='nope'.*\['given'\]"):
    build_ranking_task("toy", first_stage="nope", progress=False)
  with pytest.raises(ValueError, match="seq_len >= max_query_len"):
    build_ranking_task("toy", seq_len=8, max_query_len=8, progress=False)
