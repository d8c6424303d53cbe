"""Language-modelling data: token caches, packing with segment ids and masks, seeded shuffling,
resume position, caps, bits per byte, and loading from caches alone."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from ssm_lab.data import lm, token_cache

EOS = 256  # the byte tokenizer's document separator


def _write(folder, split, docs):
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")


def _docs(n, seed):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "délta", "eps", "zeta", "η", "theta"]
  return [" ".join(rng.choice(words, size=rng.integers(3, 40))) for _ in range(n)]


@pytest.fixture
def toy(dirs):
  data, cache = dirs
  train, valid = _docs(40, 0), _docs(12, 1)
  _write(data / "toy", "train", train)
  _write(data / "toy", "valid", valid)
  return data, cache, train, valid


def _stream(docs):
  out = []
  for d in docs:
    out += [EOS] + list(d.encode("utf-8"))
  return np.asarray(out)


def test_windows_reproduce_the_packed_stream(toy):
  _, _, train, _ = toy
  task = lm.build_lm_task("toy", seq_len=16, progress=False)
  st = task.train_stream
  stream = _stream(train)
  assert st.length == len(stream) and st.num_windows == (len(stream) - 1) // 16
  assert st.cache.meta["dtype"] == "uint8" and st.cache.num_docs == len(train)
  b = st.windows(np.arange(st.num_windows))
  L = 16
  has_eos = (np.c_[b["inputs"], b["targets"][:, -1:]] == EOS).any(axis=1)
  assert has_eos.any() and (~has_eos).any()   # both the plain-slice and the general path run
  for w in range(st.num_windows):
    np.testing.assert_array_equal(b["inputs"][w], stream[w * L:(w + 1) * L])
    np.testing.assert_array_equal(b["targets"][w], stream[w * L + 1:(w + 1) * L + 1])
  # Only targets that open the next document (its eos) are masked.
  np.testing.assert_array_equal(b["loss_mask"] == 0, b["targets"] == EOS)
  # Segment ids step by one at each eos input; positions restart there and at window starts.
  for x, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"], strict=True):
    expect_seg = np.cumsum(x == EOS) - (1 if x[0] == EOS else 0)
    np.testing.assert_array_equal(seg, expect_seg)
    starts = np.flatnonzero(np.diff(seg)) + 1
    for a, z in zip(np.r_[0, starts], np.r_[starts, L], strict=True):
      np.testing.assert_array_equal(pos[a:z], np.arange(z - a))
  # Every text byte of the covered stream is a counted target exactly once.
  covered = stream[1:st.num_windows * L + 1]
  assert b["loss_mask"].sum() == (covered != EOS).sum()


def test_shuffle_covers_each_window_once_per_epoch_and_resumes(toy):
  task = lm.build_lm_task("toy", seq_len=8, seed=3, progress=False)
  w = task.train_stream.num_windows
  bs = 4
  steps = w // bs
  ids = np.concatenate([task.train_window_ids(s, bs) for s in range(steps)])
  assert len(np.unique(ids)) == len(ids) == steps * bs          # no repeats within the epoch
  assert not np.array_equal(ids, np.sort(ids))                  # shuffled
  epoch0 = np.concatenate([task.train_window_ids(s, 1) for s in range(w)])
  epoch1 = np.concatenate([task.train_window_ids(s, 1) for s in range(w, 2 * w)])
  assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(w))
  assert not np.array_equal(epoch0, epoch1)                     # a new order every epoch
  np.testing.assert_array_equal(epoch0[:steps * bs], ids)       # batch size does not change order
  # A fresh task (a restarted run) gives the same batch for the same step: resume continues.
  again = lm.build_lm_task("toy", seq_len=8, seed=3, progress=False)
  for step in (0, 7, steps + 2):
    a, b = task.train_batch(step, bs), again.train_batch(step, bs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(task.train_batch(7, bs)["inputs"], task.train_batch(8, bs)["inputs"])
  other = lm.build_lm_task("toy", seq_len=8, seed=4, progress=False)
  assert not np.array_equal(other.train_window_ids(0, bs), task.train_window_ids(0, bs))
  assert task.position(steps, bs)["epoch"] == pytest.approx(steps * bs / w)


def test_eval_batches_are_fixed_and_padded(toy):
  task = lm.build_lm_task("toy", seq_len=8, eval_sequences=10, progress=False)
  batches = list(task.eval_batches(4))
  assert len(batches) == 3 and all(b["inputs"].shape == (4, 8) for b in batches)
  assert batches[-1]["loss_mask"][2:].sum() == 0                # 10 = 4 + 4 + 2 real rows
  again = list(task.eval_batches(4))
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, again, strict=True))
  assert sum(b["loss_mask"].sum() for b in batches) == task.eval_count


def test_bits_per_byte_bytes_and_bpe(toy):
  _, _, _, valid = toy
  text_bytes = sum(len(d.encode("utf-8")) for d in valid)
  for tokenizer in ("bytes", "bpe:300"):
    # seq_len 1: every stream token but the first is a target, so all text bytes are counted.
    task = lm.build_lm_task("toy", tokenizer=tokenizer, seq_len=1, eval_sequences=0,
                            progress=False)
    assert task.eval_bytes == text_bytes
    n = task.eval_count
    out = task.eval_summary({"loss_sum": n * math.log(2) * 3.0, "correct": 0.0, "count": n})
    assert out["bits_per_token"] == pytest.approx(3.0)
    assert out["bits_per_byte"] == pytest.approx(3.0 * n / text_bytes)
    assert out["perplexity"] == pytest.approx(8.0)
    if tokenizer == "bytes":
      assert n == text_bytes
    else:
      assert n < text_bytes and task.train_stream.cache.meta["dtype"] == "uint16"


def test_caps_prefix_and_spread(toy):
  _, _, train, valid = toy
  task = lm.build_lm_task("toy", seq_len=4, train_tokens=100, eval_tokens=60, progress=False)
  tr, ev = task.train_stream.cache, task.eval_stream.cache
  assert tr.num_tokens == 100 and tr.path.name == "train-max100"
  flat = np.concatenate([np.frombuffer(d.encode(), np.uint8) for d in train])
  np.testing.assert_array_equal(np.asarray(tr.tokens), flat[:100])     # a prefix of the split
  assert ev.num_docs == len(valid) and ev.meta["cap_mode"] == "spread"
  per = 60 // len(valid)
  for d, (a, z) in zip(valid, zip(ev.doc_offsets[:-1], ev.doc_offsets[1:], strict=True), strict=True):
    raw = np.frombuffer(d.encode(), np.uint8)
    mid = (len(raw) - per) // 2 if len(raw) > per else 0
    np.testing.assert_array_equal(np.asarray(ev.tokens[a:z]), raw[mid:mid + per])


def test_runs_from_the_caches_alone_and_detects_stale_caches(toy):
  data, cache, _, _ = toy
  first = lm.build_lm_task("toy", tokenizer="bpe:300", seq_len=8, progress=False)
  shutil.move(data / "toy", data.parent / "away")                        # the GPU machine: no raw data
  shutil.rmtree(cache / "tokenizers")                                    # only the token caches
  second = lm.build_lm_task("toy", tokenizer="bpe:300", seq_len=8, progress=False)
  a, b = first.train_batch(2, 3), second.train_batch(2, 3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  shutil.move(data.parent / "away", data / "toy")
  lm.build_lm_task("toy", seq_len=8, progress=False)
  _write(data / "toy", "train", _docs(41, 0))                            # the corpus changed
  with pytest.raises(ValueError, match="built from other files"):
    lm.build_lm_task("toy", seq_len=8, progress=False)


def test_missing_dataset_and_split_errors(toy):
  with pytest.raises(ValueError, match=r"dataset 'nope' not found.*available: \['toy'\].*no token "
                                       r"caches"):
    lm.build_lm_task("nope", progress=False)
  with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'valid'\]"):
    lm.build_lm_task("toy", eval_split="test", progress=False)
  with pytest.raises(ValueError, match="too few for one window"):
    lm.build_lm_task("toy", seq_len=100000, progress=False)


def test_cache_folder_is_versioned_by_tokenizer(toy):
  lm.build_lm_task("toy", seq_len=8, progress=False)
  lm.build_lm_task("toy", tokenizer="bpe:300", seq_len=8, progress=False)
  found = token_cache.find_caches("", "toy")
  names = {p.parent.name.split("-")[0] for p in found}
  assert names == {"bytes", "toy"} and len(found) == 4
  for p in found:
    assert (p.parent / "tokenizer.json").is_file()
