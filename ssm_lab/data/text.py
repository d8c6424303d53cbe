"""Text corpora for language modelling: find the files of each split and stream their documents.

A corpus is a folder of JSONL files (one JSON object per line, the document under `text_field`) and/or
plain-text files, each optionally compressed (.gz, .xz, .bz2). The split of a file comes from its name
or its parent folder's name: `train`, `valid`/`validation`/`val`/`dev`, `test` (for example
`train-00.jsonl.xz`, `wiki.valid.tokens.xz`, `valid/book1.txt`); a file that names no split belongs to
`train`. Documents of plain-text files are cut by `doc_split`:

  "file"      the whole file is one document
  "line"      every non-empty line is a document
  "blank"     paragraphs separated by empty lines are documents
  "wikitext"  WikiText articles: a new document at each ` = Title = ` heading that follows an empty
              line (formula lines shaped like headings inside an article do not follow one)
  "auto"      "wikitext" for `.tokens` files, "file" otherwise

Everything streams: no file is read into memory whole except a single plain-text document.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import lzma
import re
from pathlib import Path
from typing import IO, Iterator

from ssm_lab.data import paths

SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid",
                 "val": "valid", "dev": "valid", "test": "test", "testing": "test"}
_COMPRESSION = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_JSONL = {".jsonl", ".json", ".ndjson"}
_TEXT = {".txt", ".text", ".tokens", ".raw"}
DOC_SPLITS = ("auto", "file", "line", "blank", "wikitext")


def open_text(path: Path) -> IO[str]:
  """`path` opened for reading UTF-8 text, decompressing .gz/.xz/.bz2 by suffix."""
  opener = _COMPRESSION.get(path.suffix.lower())
  if opener is None:
    return open(path, encoding="utf-8", newline="")
  return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", newline="")


def strip_compression(name: str) -> str:
  for suffix in _COMPRESSION:
    if name.lower().endswith(suffix):
      return name[: -len(suffix)]
  return name


def file_kind(path: Path) -> str | None:
  """"jsonl", "text" or None (not a corpus file) from the name, ignoring compression."""
  suffix = Path(strip_compression(path.name)).suffix.lower()
  if suffix in _JSONL:
    return "jsonl"
  if suffix in _TEXT:
    return "text"
  return None


def split_of(path: Path, base: Path) -> str:
  """The split a file belongs to, from its name, else its folders' names; "train" otherwise."""
  stem = strip_compression(path.name)
  for part in [stem] + [p for p in reversed(path.relative_to(base).parts[:-1])]:
    for token in re.split(r"[^A-Za-z]+", part.lower()):
      if token in SPLIT_ALIASES:
        return SPLIT_ALIASES[token]
  return "train"


def iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
  """The `text_field` of every line of a JSONL file.

  Raises:
    ValueError: a line that is not a JSON object with a string `text_field`; names file and line.
  """
  with open_text(path) as f:
    lines = enumerate(f, 1)
    while True:
      try:
        line_no, line = next(lines)
      except StopIteration:
        return
      except UnicodeDecodeError as e:  # name the file: the codec's message does not
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}:{line_no}: expected a JSON object with a string field "
                         f"{text_field!r} (set the task field text_field); got {keys}")
      yield obj[text_field]


_WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


def iter_text(path: Path, doc_split: str) -> Iterator[str]:
  """The documents of a plain-text file, cut by `doc_split` (see the module docstring)."""
  if doc_split == "auto":
    doc_split = "wikitext" if strip_compression(path.name).endswith(".tokens") else "file"
  if doc_split not in DOC_SPLITS:
    raise ValueError(f"doc_split={doc_split!r} must be one of {list(DOC_SPLITS)}")
  try:
    with open_text(path) as f:
      if doc_split == "file":
        text = f.read()
        if text.strip():
          yield text
        return
      buf: list[str] = []
      prev_blank = True
      for line in f:
        blank = not line.strip()
        if doc_split == "line":
          if not blank:
            yield line.rstrip("\r\n")
          continue
        if doc_split == "blank":
          boundary = blank
        else:  # wikitext: a heading after an empty line opens an article
          boundary = prev_blank and bool(_WIKITEXT_HEADING.match(line.rstrip("\r\n")))
        if boundary and any(s.strip() for s in buf):
          yield "".join(buf)
          buf = []
        if not (doc_split == "blank" and blank):
          buf.append(line)
        prev_blank = blank
      if any(s.strip() for s in buf):
        yield "".join(buf)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a chunk)") from None


@dataclasses.dataclass
class TextCorpus:
  """The files of a text corpus by split, and how to read documents out of them."""

  name: str
  root: Path
  files: dict[str, list[Path]]
  text_field: str = "text"
  doc_split: str = "auto"

  @property
  def splits(self) -> list[str]:
    order = {"train": 0, "valid": 1, "test": 2}
    return sorted(self.files, key=lambda s: (order.get(s, 3), s))

  def split_files(self, split: str) -> list[Path]:
    if split not in self.files:
      raise ValueError(f"corpus {self.name!r} ({self.root}) has no split {split!r}; it has "
                       f"{self.splits}")
    return self.files[split]

  def documents(self, split: str) -> Iterator[str]:
    """Every document of `split`, in file order then line order."""
    for path in self.split_files(split):
      if file_kind(path) == "jsonl":
        yield from iter_jsonl(path, self.text_field)
      else:
        yield from iter_text(path, self.doc_split)

  def fingerprint(self, split: str) -> str:
    return paths.files_fingerprint(self.split_files(split), self.root)


def find_corpus(folder: Path, name: str = "", text_field: str = "text",
                doc_split: str = "auto") -> TextCorpus:
  """The text corpus in `folder`.

  Raises:
    ValueError: no JSONL or plain-text file in the folder; lists what is there.
  """
  if doc_split not in DOC_SPLITS:
    raise ValueError(f"doc_split={doc_split!r} must be one of {list(DOC_SPLITS)}")
  files: dict[str, list[Path]] = {}
  for path in paths.data_files(folder):
    if file_kind(path) is None:
      continue
    files.setdefault(split_of(path, folder), []).append(path)
  if not files:
    present = [str(p.relative_to(folder)) for p in paths.data_files(folder)][:20]
    raise ValueError(f"{folder} holds no text corpus (JSONL or plain-text files, optionally .gz/.xz/"
                     f".bz2); files there: {present}")
  return TextCorpus(name=name or folder.name, root=folder, files=files, text_field=text_field,
                    doc_split=doc_split)
