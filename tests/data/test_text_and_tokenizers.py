"""Corpus readers (JSONL, compressed, plain text, split detection, errors) and the tokenizers."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from ssm_lab.data import paths, text, tokenizer as tk


def _jsonl(path: Path, docs: list[str], opener=open) -> None:
  with opener(path, "wt", encoding="utf-8") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"id": i, "text": d}) + "\n")


def test_jsonl_plain_gz_xz_and_split_names(tmp_path):
  _jsonl(tmp_path / "train-00.jsonl", ["a1", "a2"])
  _jsonl(tmp_path / "train-01.jsonl.gz", ["b1"], gzip.open)
  _jsonl(tmp_path / "validation.jsonl.xz", ["v1"], lzma.open)
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "book.txt").write_text("whole\n\nbook\n")
  (tmp_path / "misc.jsonl").write_text(json.dumps({"text": "no split name"}) + "\n")
  (tmp_path / "README.md").write_text("ignored")
  c = text.find_corpus(tmp_path)
  assert c.splits == ["train", "valid", "test"]
  assert list(c.documents("train")) == ["no split name", "a1", "a2", "b1"]  # files sorted by name
  assert list(c.documents("valid")) == ["v1"]
  assert list(c.documents("test")) == ["whole\n\nbook\n"]
  with pytest.raises(ValueError, match=r"no split 'dev'.*\['train', 'valid', 'test'\]"):
    c.split_files("dev")


def test_plain_text_document_splitting(tmp_path):
  p = tmp_path / "x.txt"
  p.write_text("one\ntwo\n\n\nthree\n")
  assert list(text.iter_text(p, "line")) == ["one", "two", "three"]
  assert list(text.iter_text(p, "blank")) == ["one\ntwo\n", "three\n"]
  assert list(text.iter_text(p, "file")) == ["one\ntwo\n\n\nthree\n"]
  w = tmp_path / "wiki.valid.tokens"
  # The second heading-shaped line follows text, not an empty line: it is a formula, not a title.
  w.write_text(" \n = A = \n \n text a \n = 1 k / s = \n \n = B = \n \n text b \n")
  docs = list(text.iter_text(w, "auto"))
  assert len(docs) == 2 and docs[0].startswith(" \n = A =") and "= 1 k / s =" in docs[0]
  assert docs[1].startswith(" = B =")


def test_malformed_jsonl_names_file_and_line(tmp_path):
  p = tmp_path / "train.jsonl"
  p.write_text('{"text": "ok"}\n\n{"text": "ok"\n')
  with pytest.raises(ValueError, match=r"train\.jsonl:3: not valid JSON"):
    list(text.iter_jsonl(p, "text"))
  p.write_text('{"text": "ok"}\n{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"train\.jsonl:2: .*string field 'text'.*\['body'\]"):
    list(text.iter_jsonl(p, "text"))


def test_no_corpus_lists_the_files(tmp_path):
  (tmp_path / "data.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match=r"no text corpus.*data\.csv"):
    text.find_corpus(tmp_path)


def test_unknown_dataset_lists_available(dirs):
  data, _ = dirs
  (data / "corpus_a").mkdir()
  (data / "tokenizers").mkdir()
  with pytest.raises(ValueError, match=r"dataset 'nope' not found.*available: \['corpus_a'\]"):
    paths.resolve_dataset("nope")
  assert paths.resolve_dataset("corpus_a") == data / "corpus_a"
  assert paths.resolve_dataset(str(data / "corpus_a")) == data / "corpus_a"


def test_data_dir_resolution_order(tmp_path, monkeypatch):
  monkeypatch.setenv("SSM_LAB_DATA_DIR", str(tmp_path))
  assert paths.data_root() == tmp_path
  assert paths.data_root(str(tmp_path / "x"), required=False) is None
  with pytest.raises(ValueError, match="no data directory"):
    paths.data_root(str(tmp_path / "x"))
  monkeypatch.delenv("SSM_LAB_DATA_DIR")
  assert paths.data_root_candidates()[0] == paths.repo_root().parent / "shared" / "data"


SAMPLE = "Héllo wörld — naïve café 日本語!\n\nA second paragraph, with numbers 12345 and tabs\t.\n"


def test_byte_tokenizer_roundtrip_and_bytes():
  t = tk.ByteTokenizer()
  ids = t.encode(SAMPLE)
  assert t.decode(ids) == SAMPLE and len(ids) == len(SAMPLE.encode())
  assert t.vocab_size == 259 and {t.eos_id, t.sep_id, t.pad_id} == {256, 257, 258}
  assert t.token_bytes()[ids].sum() == len(SAMPLE.encode()) and t.token_bytes()[256:].sum() == 0
  assert t.token_dtype() == np.uint8


def _train_docs():
  return [SAMPLE * 3, "the cat sat on the mat " * 20, "naïve café " * 10] * 5


def test_bpe_trains_saves_and_reloads_by_name(dirs):
  _, cache = dirs
  calls = []

  def texts():
    calls.append(1)
    return iter(_train_docs())

  t1 = tk.load_tokenizer("bpe:300", dataset_key="toy", train_texts=texts, show_progress=False)
  assert calls == [1] and (cache / "tokenizers" / "toy-bpe300.json").is_file()
  assert t1.vocab_size == 300 and t1.name == "toy-bpe300"
  assert (t1.eos_id, t1.sep_id, t1.pad_id) == (0, 1, 2)
  t2 = tk.load_tokenizer("bpe:300", dataset_key="toy", train_texts=texts)  # reloaded, not retrained
  t3 = tk.load_tokenizer("toy-bpe300")                                      # by name
  assert calls == [1] and t2.fingerprint() == t1.fingerprint() == t3.fingerprint()
  ids = t3.encode(SAMPLE)
  assert t3.decode(ids) == SAMPLE
  # Byte-level BPE: the bytes of the tokens add up to the UTF-8 bytes of the text.
  assert t3.token_bytes()[ids].sum() == len(SAMPLE.encode())
  assert len(ids) < len(SAMPLE.encode()) and t3.token_dtype() == np.uint16


def test_long_documents_encode_in_pieces_identically(dirs, monkeypatch):
  t = tk.load_tokenizer("bpe:300", dataset_key="toy", train_texts=lambda: iter(_train_docs()),
                        show_progress=False)
  doc = "".join(f"line {i} of the text,  with  spaces\n" for i in range(400)) + "\n\n  tail"
  whole = t.encode(doc)
  monkeypatch.setattr(tk, "_PIECE_CHARS", 100)
  assert len(t._pieces(doc)) > 10
  assert np.array_equal(t.encode(doc), whole)


def test_unknown_tokenizer_lists_available(dirs):
  data, _ = dirs
  (data / "tokenizers" / "mytok").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"unknown tokenizer 'nope'; available: \['bytes', 'mytok'\]"):
    tk.load_tokenizer("nope")


REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "tokenizers"


@pytest.mark.skipif(not (REAL / "gpt2" / "encoder.json").is_file(), reason="no shared GPT-2 files")
def test_provided_gpt2_and_neox_tokenizers(monkeypatch):
  monkeypatch.setenv("SSM_LAB_DATA_DIR", str(REAL.parent))
  g = tk.load_tokenizer("gpt2")
  assert list(g.encode("Hello world")) == [15496, 995]          # OpenAI GPT-2 ids
  assert (g.eos_id, g.sep_id, g.pad_id, g.vocab_size) == (50256, 50257, 50258, 50259)
  n = tk.load_tokenizer("gpt-neox-20b")
  assert (n.eos_id, n.pad_id, n.vocab_size) == (0, 1, 50278)
  for t in (g, n):
    ids = t.encode(SAMPLE + "<|endoftext|>")  # literal text, not the special token
    assert t.eos_id not in ids and t.decode(ids) == SAMPLE + "<|endoftext|>"
    assert t.token_bytes()[ids].sum() == len((SAMPLE + "<|endoftext|>").encode())
