"""The ranking study (RankMamba's comparison): the full sweep's shape, and its smoke sweep end to end
on CPU (pretraining a tiny backbone, LCE and BCE fine-tuning, every collection role, the DL20
zero-shot path, throughput, results, plot and README table) on tiny collections written here."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ssm_lab import config as config_lib
from ssm_lab import experiments
from ssm_lab.experiments import results as results_lib

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")
WORDS = "cat dog whale song mat red grey pet food chase sing migrate play loyal".split()


def study():
  return experiments.get_study("ranking", EXPERIMENTS)


def _beir(root, n_docs=12, splits=("train", "test")):
  (root / "qrels").mkdir(parents=True)
  docs = {f"d{i}": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(5)) for i in range(n_docs)}
  with open(root / "corpus.jsonl", "w") as f:
    for i, t in docs.items():
      f.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
  queries = {f"q{i}": f"{WORDS[i % len(WORDS)]} {WORDS[(i + 2) % len(WORDS)]}" for i in range(10)}
  with open(root / "queries.jsonl", "w") as f:
    for i, t in queries.items():
      f.write(json.dumps({"_id": i, "text": t}) + "\n")
  per = {"train": range(0, 6), "test": range(6, 10)} if len(splits) == 2 else {"test": range(10)}
  for split, qs in per.items():
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t2" for i in qs]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
  run = [f"q{i} Q0 d{(i + r) % n_docs} {r + 1} {10 - r}.0 bm25" for i in range(10) for r in range(6)]
  (root / "bm25_top100.trec").write_text("\n".join(run) + "\n")


@pytest.fixture
def carry(tmp_path, monkeypatch):
  data = tmp_path / "carry" / "data"
  (data / "gutenberg").mkdir(parents=True)
  for split, n in (("train", 40), ("valid", 4)):
    with open(data / "gutenberg" / f"{split}.jsonl", "w") as f:
      for i in range(n):
        text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(120))
        f.write(json.dumps({"id": f"{split}{i}", "text": text}) + "\n")
  _beir(data / "beir-scifact")
  _beir(data / "wikiqa")
  _beir(data / "vaswani", splits=("test",))
  _beir(data / "msmarco-trec-dl20", splits=("test",))
  monkeypatch.setenv("SSM_LAB_RANKING_CARRY", str(tmp_path / "carry"))
  monkeypatch.setenv("SSM_LAB_DATA_DIR", str(data))
  monkeypatch.setenv("SSM_LAB_CACHE_DIR", str(tmp_path / "carry" / "cache"))
  return tmp_path / "carry"


def test_full_sweep_matches_the_recipe():
  s = study()
  runs = s.runs()
  sweep = s.sweep_module()
  names = [r.name for r in runs]
  assert names == ["transformer", "mamba", "mamba2", "hybrid", "throughput", "bm25"]
  b = sweep.FULL
  assert (b.seq_len, b.group_size, b.depth, len(b.seeds), b.folds) == (512, 8, 100, 3, 5)
  assert b.tokenizer == "gpt-neox-20b"
  for run in runs[:4]:
    config_lib.validate(run.config)
    assert run.config.task.name == "lm" and run.config.task.dataset == "gutenberg"
    assert run.config.model.d_model == sweep.D_MODEL and run.evaluate is not None
  assert sweep.BACKBONES["hybrid"][0].count("A") * 4 == len(sweep.BACKBONES["hybrid"][0])
  tokens = {r.config.train.num_steps * r.config.train.batch_size * r.config.task.seq_len
            for r in runs[:4]}
  assert len(tokens) == 1  # the same pretraining tokens for every backbone


def test_smoke_sweep_end_to_end(carry, tmp_path):
  s = study()
  res = str(tmp_path / "results")
  summary = experiments.run_study(s, smoke=True, out=str(tmp_path / "out"), results_dir=res)
  records = results_lib.load_results(res, status=None)
  assert not summary["failed"], [r.get("traceback") for r in records if r["status"] != "ok"]
  by_name = {r["name"]: r for r in records}
  m = by_name["mamba2"]["metrics"]
  for key in ("scifact.lce.rerank_nDCG@10.mean", "scifact.bce.rerank_nDCG@10.mean",
              "scifact.lce.interp_nDCG@10.mean", "scifact.lce.dl20_rerank_nDCG@10.mean",
              "vaswani.lce.rerank_nDCG@10.mean", "bits_per_byte"):
    assert key in m and 0.0 <= m[key] <= 10.0, key
  workdir = by_name["mamba2"]["workdir"]
  assert os.path.exists(os.path.join(workdir, "runs", "scifact-lce-s0.trec"))
  assert any(k.endswith("train_examples_per_s") for k in by_name["throughput"]["metrics"])
  bm25 = by_name["bm25"]["metrics"]
  assert 0.0 <= bm25["scifact.bm25_nDCG@10"] <= 1.0 and "vaswani.bm25_MAP" in bm25
  # the rerankers' own first-stage numbers are BM25's on the same queries
  assert abs(m["scifact.lce.bm25_nDCG@10.mean"] - bm25["scifact.bm25_nDCG@10"]) < 1e-9
  paths = experiments.plot_study(s, res, str(tmp_path / "plots"))
  assert paths and all(os.path.exists(p) for p in paths)
  readme = tmp_path / "README.md"
  shutil.copy(s.readme, readme)
  table = experiments.table_study(s, res, str(readme))
  assert "| mamba2 |" in table and "| BM25 (first stage) |" in table and table in readme.read_text()
