"""`python -m ssm_lab.data` (list, info, prepare, bm25) and the example configs of the data tasks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssm_lab import config as config_lib
from ssm_lab.data import make_task, registry
from ssm_lab.data.__main__ import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def datasets(dirs):
  data, cache = dirs
  corpus = data / "books"
  corpus.mkdir()
  for split, docs in (("train", ["one two three", "four five"]), ("valid", ["six seven"])):
    (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  coll = data / "coll"
  (coll / "qrels").mkdir(parents=True)
  (coll / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                             for i, t in enumerate(["red apple", "green pear",
                                                                    "red car"])))
  (coll / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "red fruit apple"}) + "\n")
  (coll / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\n")
  return data, cache


def test_list_and_info(datasets, capsys):
  main(["list"])
  out = capsys.readouterr().out
  assert "books" in out and "text corpus (splits ['train', 'valid'])" in out
  assert "coll" in out and "ranking collection (beir layout)" in out
  main(["info", "books"])
  out = capsys.readouterr().out
  assert "train      1          2           22          5" in out
  assert "valid      1          1            9          2" in out
  main(["info", "coll"])
  out = capsys.readouterr().out
  assert "documents 3" in out and "test" in out and "5-fold" in out


def test_prepare_then_info_shows_the_cache(datasets, capsys):
  _, cache = datasets
  main(["prepare", "books", "--max_tokens", "10"])
  out = capsys.readouterr().out
  assert "train: 10 tokens in 1 documents (uint8" in out and "valid: 9 tokens" in out
  assert list((cache / "tokens" / "books").glob("bytes-*/train-max10/tokens.bin"))
  main(["info", "books"])
  assert "train-max10: 10 tokens" in capsys.readouterr().out


def test_bm25_command_prints_metrics_and_writes_run(datasets, tmp_path, capsys):
  main(["bm25", "coll", "--out", str(tmp_path / "run.trec")])
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.strip().startswith("test"))
  assert row.split()[1:] == ["1", "1.0000", "1.0000", "1.0000", "1.0000"]
  assert (tmp_path / "run.trec").read_text().startswith("q1 Q0 d0 1 ")


def test_unknown_dataset_exits_with_the_list(datasets, capsys):
  with pytest.raises(SystemExit) as e:
    main(["info", "nope"])
  assert e.value.code == 2
  assert "available: ['books', 'coll']" in capsys.readouterr().err


def test_module_entry_point(datasets):
  r = subprocess.run([sys.executable, "-m", "ssm_lab.data", "info", "books"], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "text corpus" in r.stdout


OURS = ("lm", "ranking", "selective_copying", "induction_heads", "word_problem")


def _configs():
  out = []
  for path in sorted((REPO / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    if cfg.task.name in OURS:
      out.append((path.name, cfg))
  return out


def test_every_data_config_validates_and_names_known_fields():
  configs = _configs()
  names = {n for n, _ in configs}
  assert {"lm_gutenberg_bytes.py", "lm_gutenberg_bpe.py", "rank_wikiqa.py", "rank_scifact.py",
          "selective_copying.py", "induction_heads.py", "s5.py"} <= names
  for name, cfg in configs:
    config_lib.validate(cfg)
    unknown = set(cfg.task.keys()) - {"name"} - registry.task_fields(cfg.task.name)
    assert not unknown, f"{name}: {unknown}"
    assert (cfg.model.head == "classifier") == (cfg.task.name == "ranking"), name


@pytest.mark.parametrize("name", ["selective_copying.py", "induction_heads.py", "s5.py", "a5.py"])
def test_synthetic_configs_build_their_task(name):
  cfg = dict(_configs())[name]
  task = make_task(cfg.task)
  b = task.train_batch(0, 2)
  assert b["inputs"].shape == (2, task.seq_len) and b["loss_mask"].sum() > 0
