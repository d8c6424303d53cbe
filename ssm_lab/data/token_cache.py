"""Memory-mapped token caches: a corpus split tokenised once, read by every run.

Layout (one folder per corpus, tokenizer, split and cap; a new tokenizer or a changed corpus gets a new
folder, so a cache is never silently reused for other data):

  <cache>/tokens/<dataset>/<tokenizer name>-<tokenizer hash>/
      tokenizer.json                   the tokenizer itself (a copied cache is self-contained)
      <split>-<all|max N>/
          tokens.bin                   the documents' tokens back to back, uint8/uint16/uint32
          doc_offsets.npy              int64 [num_docs + 1]: document d is tokens[off[d]:off[d+1]]
          meta.json                    what was tokenised, counts, format version

Document separators are not stored: packing (ssm_lab.data.lm) puts `eos_id` before every document, so
a byte-level cache needs one byte per token. A cap of N tokens keeps a prefix of the split ("prefix",
for training) or the middle N / num_docs tokens of every document ("spread", for evaluation sets that
should cover every document). Folders are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ssm_lab.data import paths
from ssm_lab.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
CAP_MODES = ("prefix", "spread")
# Documents are encoded in groups of about this many characters (bounded memory, parallel encode).
_GROUP_CHARS = 8 << 20


@dataclasses.dataclass
class TokenCache:
  """An opened cache folder: `tokens` is a read-only memmap, `doc_offsets` an int64 array."""

  path: Path
  tokens: np.ndarray
  doc_offsets: np.ndarray
  meta: dict

  @property
  def num_tokens(self) -> int:
    return int(self.doc_offsets[-1])

  @property
  def num_docs(self) -> int:
    return len(self.doc_offsets) - 1

  @classmethod
  def open(cls, path: Path) -> "TokenCache":
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
      raise ValueError(f"{path} is not a finished token cache (no meta.json); run "
                       f"`python -m ssm_lab.data prepare ...` again")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path}: token cache format {meta.get('format_version')} is not "
                       f"{FORMAT_VERSION}; delete the folder and prepare again")
    offsets = np.load(path / "doc_offsets.npy")
    n = int(offsets[-1])
    tokens = (np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(n,))
              if n else np.zeros(0, np.dtype(meta["dtype"])))
    return cls(path=path, tokens=tokens, doc_offsets=offsets, meta=meta)


def tokenizer_dir(cache_dir: str, dataset_key: str, tokenizer: Tokenizer) -> Path:
  return (paths.cache_root(cache_dir) / "tokens" / dataset_key
          / f"{tokenizer.name}-{tokenizer.fingerprint()}")


def cache_path(cache_dir: str, dataset_key: str, tokenizer: Tokenizer, split: str,
               max_tokens: int) -> Path:
  """The folder of one cached split (see the module docstring)."""
  cap = f"max{max_tokens}" if max_tokens else "all"
  return tokenizer_dir(cache_dir, dataset_key, tokenizer) / f"{split}-{cap}"


def _groups(docs: Iterable[str]) -> Iterator[list[str]]:
  group, size = [], 0
  for d in docs:
    group.append(d)
    size += len(d)
    if size >= _GROUP_CHARS:
      yield group
      group, size = [], 0
  if group:
    yield group


def build(docs: Iterable[str], out: Path, tokenizer: Tokenizer, *, max_tokens: int = 0,
          cap_mode: str = "prefix", num_docs_hint: int = 0, meta: dict | None = None,
          progress: bool = True, desc: str = "") -> TokenCache:
  """Tokenises `docs` into the cache folder `out` and opens it.

  Args:
    docs: the documents, in order (empty ones are skipped).
    max_tokens: cap on stored tokens (0: none), applied as `cap_mode` says.
    num_docs_hint: the number of documents; "spread" needs it (cap per document = max_tokens / it).
    meta: extra fields for meta.json (dataset, split, source fingerprint).
  """
  if cap_mode not in CAP_MODES:
    raise ValueError(f"cap_mode={cap_mode!r} must be one of {list(CAP_MODES)}")
  per_doc = 0
  if max_tokens and cap_mode == "spread":
    if num_docs_hint < 1:
      raise ValueError("cap_mode='spread' needs num_docs_hint >= 1")
    per_doc = max(1, max_tokens // num_docs_hint)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_tmp(out)
  tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    return _build_into(tmp, docs, out, tokenizer, max_tokens=max_tokens, cap_mode=cap_mode,
                       per_doc=per_doc, meta=meta, progress=progress, desc=desc)
  finally:
    # A failed or interrupted build leaves no half-written folder (a finished one was renamed).
    shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_tmp(out: Path) -> None:
  """Removes `<out>.tmp-PID` folders whose process is gone (a build killed before its cleanup ran);
  a live process's folder is another build in progress and is left alone."""
  for tmp in out.parent.glob(f"{out.name}.tmp-*"):
    pid = tmp.name.rsplit("-", 1)[-1]
    if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
      shutil.rmtree(tmp, ignore_errors=True)


def _build_into(tmp: Path, docs: Iterable[str], out: Path, tokenizer: Tokenizer, *,
                max_tokens: int, cap_mode: str, per_doc: int, meta: dict | None, progress: bool,
                desc: str) -> TokenCache:
  from tqdm.auto import tqdm
  dtype = tokenizer.token_dtype()
  token_bytes = tokenizer.token_bytes()
  offsets, text_bytes, cut_docs, total = [0], 0, 0, 0
  # disable=None: no bar when stderr is not a terminal (logs, subprocesses), so an error stays one line.
  bar = tqdm(total=max_tokens or None, unit="tok", unit_scale=True, disable=None if progress else True,
             desc=desc or f"tokenising into {out.name}")
  t0 = time.perf_counter()
  with open(tmp / "tokens.bin", "wb") as f:
    done = False
    for group in _groups(docs):
      for ids in tokenizer.encode_batch(group):
        if per_doc and len(ids) > per_doc:
          # The middle of a long document: its opening pages are often front matter.
          mid = (len(ids) - per_doc) // 2
          ids, cut_docs = ids[mid:mid + per_doc], cut_docs + 1
        if max_tokens and total + len(ids) > max_tokens:
          ids, cut_docs = ids[: max_tokens - total], cut_docs + 1
        if len(ids) == 0:
          continue
        if ids.max() > tokenizer.max_text_id():
          raise ValueError(f"tokenizer {tokenizer.name!r} returned id {int(ids.max())} above its "
                           f"text ids ({tokenizer.max_text_id()})")
        f.write(ids.astype(dtype).tobytes())
        total += len(ids)
        text_bytes += int(token_bytes[ids].sum())
        offsets.append(total)
        bar.update(len(ids))
        if max_tokens and total >= max_tokens and cap_mode == "prefix":
          done = True
          break
      bar.set_postfix(docs=len(offsets) - 1)
      if done:
        break
  bar.close()
  if total == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ValueError(f"no tokens for {out}: the split has no non-empty documents")
  np.save(tmp / "doc_offsets.npy", np.asarray(offsets, np.int64))
  info = dict(meta or {})
  info.update(format_version=FORMAT_VERSION, dtype=dtype.name, num_tokens=total,
              num_docs=len(offsets) - 1, text_bytes=text_bytes, max_tokens=max_tokens,
              cap_mode=cap_mode, cut_docs=cut_docs,
              tokenizer=dict(name=tokenizer.name, fingerprint=tokenizer.fingerprint(),
                             vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id),
              build_seconds=round(time.perf_counter() - t0, 2))
  (tmp / "meta.json").write_text(json.dumps(info, indent=1))
  if out.exists():  # another process finished first; keep its folder
    shutil.rmtree(tmp, ignore_errors=True)
  else:
    tmp.rename(out)
  tok_file = out.parent / "tokenizer.json"
  if not tok_file.exists():
    tokenizer.save(tok_file)
  return TokenCache.open(out)


def find_caches(cache_dir: str, dataset_key: str) -> list[Path]:
  """Finished cache folders of a dataset (any tokenizer, split, cap)."""
  root = paths.cache_root(cache_dir) / "tokens" / dataset_key
  if not root.is_dir():
    return []
  return sorted(p.parent for p in root.glob("*/*/meta.json"))
