"""Language modelling on a text corpus: token caches, packing, seeded shuffling, bits per byte.

Packing. A split's documents form one stream in which every document is preceded by `eos_id`
(`<|endoftext|>`): `eos d0 eos d1 eos d2 ...`. The stream is cut into non-overlapping windows of
`seq_len + 1` tokens that share their edge token (window c covers stream positions
[c * seq_len, (c + 1) * seq_len]); inputs are a window's first `seq_len` tokens and targets its last
`seq_len`. Within a window:

  segment_ids  the document each input token belongs to, counted from 0 at the window start
  positions    the position within that document's part of the window (0 at a document start or the
               window start: RoPE sees only differences, and small numbers keep float32 exact)
  loss_mask    0 where the target opens the next document (its `eos` cannot be predicted from another
               document the model may not attend to), else 1

so every text token of the stream is a counted target exactly once, after its own document's `eos`
and earlier tokens. Bits per byte divide the summed loss by the UTF-8 bytes of the counted targets.

Shuffling and resume. Training example i (i = step * batch_size + row) is window `perm_e[i mod W]` of
epoch e = i // W, with `perm_e` a permutation of the W windows drawn from (seed, e). `train_batch` is a
pure function of (seed, step, batch_size): a run resumed at step s gets exactly the batch it would have
had, and every window is seen once per epoch.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ssm_lab.data import paths, text, token_cache
from ssm_lab.data.base import Batch
from ssm_lab.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_file

DEFAULT_BPE_TRAIN_BYTES = 32 << 20


class PackedStream:
  """The windows of one cached split (see the module docstring)."""

  def __init__(self, cache: token_cache.TokenCache, eos_id: int, seq_len: int):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    self.cache, self.eos_id, self.seq_len = cache, eos_id, seq_len
    n_docs = cache.num_docs
    # Stream position of each document's eos: its token offset plus one eos per earlier document.
    self.doc_starts = cache.doc_offsets[:-1] + np.arange(n_docs, dtype=np.int64)
    self.length = cache.num_tokens + n_docs
    self.num_windows = (self.length - 1) // seq_len
    if self.num_windows < 1:
      raise ValueError(f"{cache.path}: {self.length} stream tokens are too few for one window of "
                       f"seq_len + 1 = {seq_len + 1}; lower seq_len or cache more tokens")

  def windows(self, ids: np.ndarray) -> Batch:
    """The packed examples of windows `ids` [batch]: the "lm" batch dict, [batch, seq_len] each."""
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_windows):
      raise ValueError(f"window ids must be in [0, {self.num_windows}), got {ids.min()}..{ids.max()}")
    length, rows = self.seq_len, len(ids)
    start = ids * length
    tokens = np.empty((rows, length + 1), np.int32)
    loss_mask = np.ones((rows, length), np.float32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.empty((rows, length), np.int32)
    positions[:] = np.arange(length, dtype=np.int32)
    # Most windows of long documents lie inside one document past its eos: a plain slice of the
    # cache, no per-token search. The others take the general path below.
    first = np.searchsorted(self.doc_starts, start, side="right") - 1
    last = np.searchsorted(self.doc_starts, start + length, side="right") - 1
    simple = (first == last) & (start != self.doc_starts[first])
    for row in np.flatnonzero(simple):
      phys = start[row] - first[row] - 1
      tokens[row] = self.cache.tokens[phys:phys + length + 1]
    mixed = np.flatnonzero(~simple)
    if len(mixed):
      pos = start[mixed, None] + np.arange(length + 1, dtype=np.int64)      # [rows, L + 1]
      doc = np.searchsorted(self.doc_starts, pos, side="right") - 1
      doc_start = self.doc_starts[doc]
      is_eos = pos == doc_start
      t = self.cache.tokens[np.where(is_eos, 0, pos - doc - 1)].astype(np.int32)
      t[is_eos] = self.eos_id
      tokens[mixed] = t
      seg = doc - doc[:, :1]
      loss_mask[mixed] = seg[:, 1:] == seg[:, :-1]
      segment_ids[mixed] = seg[:, :-1]
      positions[mixed] = pos[:, :-1] - np.maximum(doc_start[:, :-1], start[mixed, None])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask,
            "segment_ids": segment_ids, "positions": positions}


def open_corpus(dataset: str, data_dir: str = "", text_field: str = "text",
                doc_split: str = "auto") -> text.TextCorpus:
  folder = paths.resolve_dataset(dataset, data_dir)
  return text.find_corpus(folder, name=paths.dataset_key(dataset), text_field=text_field,
                          doc_split=doc_split)


def get_tokenizer(spec: str, dataset: str, *, data_dir: str = "", cache_dir: str = "",
                  corpus: text.TextCorpus | None = None,
                  bpe_train_bytes: int = DEFAULT_BPE_TRAIN_BYTES, progress: bool = True,
                  train_split: str = "train") -> Tokenizer:
  """The tokenizer `spec` for `dataset`; "bpe:<N>" trains on the corpus's train split if needed."""
  train_texts = (lambda: corpus.documents(train_split)) if corpus is not None else None
  key = paths.dataset_key(dataset)
  m = re.fullmatch(r"bpe:(\d+)", spec)
  if m and corpus is None:
    # No raw data here: a tokenizer stored beside a carried token cache will do.
    stored = sorted((paths.cache_root(cache_dir) / "tokens" / key).glob(
        f"{key}-bpe{m.group(1)}-*/tokenizer.json"))
    if stored and not (paths.cache_root(cache_dir) / "tokenizers" / f"{key}-bpe{m.group(1)}.json"
                       ).is_file():
      newest = max(stored, key=lambda p: p.stat().st_mtime)
      return load_tokenizer_file(newest, f"{key}-bpe{m.group(1)}")
  return load_tokenizer(spec, cache_dir=cache_dir, data_dir=data_dir, dataset_key=key,
                        train_texts=train_texts,
                        bpe_train_bytes=bpe_train_bytes, show_progress=progress)


def prepare_split(corpus: text.TextCorpus | None, dataset: str, split: str, tokenizer: Tokenizer, *,
                  cache_dir: str = "", max_tokens: int = 0, cap_mode: str = "prefix",
                  progress: bool = True, build: bool = True) -> token_cache.TokenCache:
  """The token cache of one split: opened if it exists, else built from `corpus` (when `build`).

  Raises:
    ValueError: no cache and nothing to build it from (or `build` is False); says what exists.
  """
  key = paths.dataset_key(dataset)
  out = token_cache.cache_path(cache_dir, key, tokenizer, split, max_tokens)
  if (out / "meta.json").is_file():
    cache = token_cache.TokenCache.open(out)
    if corpus is not None and split in corpus.files:
      fp = corpus.fingerprint(split)
      if cache.meta.get("source_fingerprint") not in (None, fp):
        raise ValueError(f"{out} was built from other files than {corpus.root} holds now (corpus "
                         f"fingerprint {cache.meta.get('source_fingerprint')} != {fp}); delete it and "
                         f"prepare again")
    return cache
  if corpus is None or not build:
    found = [str(p) for p in token_cache.find_caches(cache_dir, key)]
    why = "the raw dataset is not available here" if corpus is None else "building is off"
    raise ValueError(f"no token cache {out} and {why}; caches found for {key!r}: {found or 'none'};"
                     f" run `python -m ssm_lab.data prepare {dataset} --tokenizer ... ` where the "
                     f"data is, and carry the cache folder")
  num_docs = 0
  if max_tokens and cap_mode == "spread":
    num_docs = sum(1 for _ in corpus.documents(split))
  meta = dict(dataset=dataset, dataset_key=key, split=split, source=str(corpus.root),
              source_fingerprint=corpus.fingerprint(split),
              source_files=[str(p.relative_to(corpus.root)) for p in corpus.split_files(split)])
  return token_cache.build(corpus.documents(split), out, tokenizer, max_tokens=max_tokens,
                           cap_mode=cap_mode, num_docs_hint=num_docs, meta=meta, progress=progress,
                           desc=f"{key}/{split} ({tokenizer.name})")


class LMTask:
  """Next-token prediction on a cached corpus (kind "lm"); implements the `Task` protocol."""

  kind = "lm"
  num_classes = 0

  def __init__(self, train: token_cache.TokenCache, evaluation: token_cache.TokenCache,
               tokenizer: Tokenizer, seq_len: int, seed: int = 0, eval_sequences: int = 0,
               name: str = "lm"):
    self.name = name
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    self.seq_len = seq_len
    self.seed = seed
    self.train_stream = PackedStream(train, tokenizer.eos_id, seq_len)
    self.eval_stream = PackedStream(evaluation, tokenizer.eos_id, seq_len)
    n = self.eval_stream.num_windows
    if eval_sequences and eval_sequences < n:
      # Evenly spaced windows: a small evaluation set still covers every part of the split.
      self.eval_ids = np.unique(np.linspace(0, n - 1, eval_sequences).round().astype(np.int64))
    else:
      self.eval_ids = np.arange(n, dtype=np.int64)
    self._perms: dict[int, np.ndarray] = {}
    token_bytes = tokenizer.token_bytes()
    self.eval_count, self.eval_bytes = 0, 0
    for i in range(0, len(self.eval_ids), 256):
      b = self.eval_stream.windows(self.eval_ids[i:i + 256])
      mask = b["loss_mask"] > 0
      self.eval_count += int(mask.sum())
      self.eval_bytes += int(token_bytes[b["targets"][mask]].sum())

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:
        self._perms.pop(min(self._perms))
      rng = np.random.default_rng([self.seed, 3, epoch])
      self._perms[epoch] = rng.permutation(self.train_stream.num_windows)
    return self._perms[epoch]

  def train_window_ids(self, step: int, batch_size: int) -> np.ndarray:
    """The windows of training step `step` [batch_size] (see the module docstring)."""
    n = self.train_stream.num_windows
    ex = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, j = ex // n, ex % n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
      sel = epoch == e
      out[sel] = self._perm(int(e))[j[sel]]
    return out

  def position(self, step: int, batch_size: int) -> dict[str, float]:
    """Where step `step` starts in the data: epoch (fractional) and examples consumed before it."""
    seen = step * batch_size
    return {"epoch": seen / self.train_stream.num_windows, "examples_seen": float(seen)}

  def train_batch(self, step: int, batch_size: int) -> Batch:
    if step < 0 or batch_size < 1:
      raise ValueError(f"train_batch needs step >= 0 and batch_size >= 1, got {step}, {batch_size}")
    return self.train_stream.windows(self.train_window_ids(step, batch_size))

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """The fixed evaluation windows, in order; the last batch is padded with rows whose loss_mask is
    0, so every batch has shape [batch_size, seq_len]."""
    for i in range(0, len(self.eval_ids), batch_size):
      b = self.eval_stream.windows(self.eval_ids[i:i + batch_size])
      short = batch_size - len(b["inputs"])
      if short:
        b = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
      yield b

  def eval_summary(self, totals: dict[str, float]) -> dict[str, float]:
    """Perplexity, bits per token and bits per byte from the summed eval loss (nats).

    The byte count is exact when `totals["count"]` covers the whole eval set; if the loop evaluated
    only part of it, the set's mean bytes per counted token stand in.
    """
    count, loss_sum = float(totals["count"]), float(totals["loss_sum"])
    if count <= 0:
      return {}
    n_bytes = self.eval_bytes if abs(count - self.eval_count) < 0.5 else \
        self.eval_bytes * count / max(self.eval_count, 1)
    mean = loss_sum / count
    return {"perplexity": math.exp(min(mean, 700.0)), "bits_per_token": mean / math.log(2),
            "bits_per_byte": loss_sum / math.log(2) / max(n_bytes, 1)}

  def save_artifacts(self, directory: str | Path) -> None:
    """Writes the tokenizer and a description of the data into a run's folder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save(d / "tokenizer.json")
    info = {"task": self.name, "tokenizer": self.tokenizer.name,
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
            "train_cache": str(self.train_stream.cache.path),
            "eval_cache": str(self.eval_stream.cache.path),
            "train_meta": self.train_stream.cache.meta, "eval_meta": self.eval_stream.cache.meta,
            "seq_len": self.seq_len, "seed": self.seed, "eval_windows": int(len(self.eval_ids))}
    (d / "data.json").write_text(json.dumps(info, indent=1))


def build_lm_task(dataset: str, *, tokenizer: str = "bytes", seq_len: int = 1024, seed: int = 0,
                  data_dir: str = "", cache_dir: str = "", train_split: str = "train",
                  eval_split: str = "valid", train_tokens: int = 0, eval_tokens: int = 0,
                  eval_sequences: int = 256, text_field: str = "text", doc_split: str = "auto",
                  bpe_train_bytes: int = DEFAULT_BPE_TRAIN_BYTES, build_cache: bool = True,
                  progress: bool = True) -> LMTask:
  """An `LMTask` from a dataset name or path; builds missing token caches when the data is here.

  On a machine with the caches but not the raw data (the GPU machine), the caches are used as they
  are; with neither, the error lists the datasets and caches that exist.
  """
  try:
    corpus: text.TextCorpus | None = open_corpus(dataset, data_dir, text_field, doc_split)
  except ValueError as e:
    key = paths.dataset_key(dataset)
    if not token_cache.find_caches(cache_dir, key):
      raise ValueError(f"{e}; and no token caches for {key!r} under "
                       f"{paths.cache_root(cache_dir) / 'tokens'}") from None
    corpus = None
  if corpus is not None:
    for split in (train_split, eval_split):
      corpus.split_files(split)  # a clear error naming the splits that exist
  tok = get_tokenizer(tokenizer, dataset, data_dir=data_dir, cache_dir=cache_dir, corpus=corpus,
                      bpe_train_bytes=bpe_train_bytes, progress=progress, train_split=train_split)
  train = prepare_split(corpus, dataset, train_split, tok, cache_dir=cache_dir,
                        max_tokens=train_tokens, cap_mode="prefix", progress=progress,
                        build=build_cache)
  evaluation = prepare_split(corpus, dataset, eval_split, tok, cache_dir=cache_dir,
                             max_tokens=eval_tokens, cap_mode="spread", progress=progress,
                             build=build_cache)
  return LMTask(train, evaluation, tok, seq_len=seq_len, seed=seed, eval_sequences=eval_sequences,
                name=f"lm:{paths.dataset_key(dataset)}")
