"""Tokenizers behind one interface: byte-level, BPE trained with `tokenizers`, and tokenizer files.

`load_tokenizer(spec, ...)` understands:

  "bytes"            UTF-8 bytes 0..255 plus three specials (no vocabulary file): 259 tokens
  "bpe:<N>"          byte-level BPE with N tokens trained on a corpus's train split (LM) or a
                     collection's documents (ranking); saved as `<cache>/tokenizers/<dataset>-bpe<N>.json`
                     on first use and reloaded from there by that name afterwards
  "<name>"           a tokenizer saved under `<cache>/tokenizers/<name>.json`, else a folder
                     `<data>/tokenizers/<name>/` (e.g. "gpt2", "gpt-neox-20b") holding `tokenizer.json`,
                     any single `*.json` tokenizer file, or GPT-2's `encoder.json` + `vocab.bpe`
                     (also `vocab.json` + `merges.txt`)
  a path             a `tokenizers` JSON file or such a folder

Every tokenizer has three special ids: `eos_id` (the document separator `<|endoftext|>`, placed at the
start of every packed document), `sep_id` (between query and document of a cross-encoder input) and
`pad_id`. A tokenizer file lacking one gets it appended after its vocabulary (GPT-2: sep 50257, pad
50258), without changing any existing id. `token_bytes()` gives each token's length in UTF-8 bytes
(0 for specials), from which evaluation computes bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ssm_lab.data import paths

EOS, SEP, PAD = "<|endoftext|>", "<|sep|>", "<|pad|>"
# Names a tokenizer file may already use for each special, in order of preference.
_SPECIAL_CANDIDATES = {
    "eos": (EOS, "</s>", "<eos>", "<|end_of_text|>"),
    "sep": (SEP, "<sep>", "[SEP]"),
    "pad": (PAD, "<|padding|>", "<pad>", "[PAD]"),
}
_BYTES_FORMAT = "ssm_lab-bytes-v1"
# Documents longer than this are cut (at a newline before a non-space character, which byte-level
# pre-tokenisation never merges across) into pieces that encode in parallel.
_PIECE_CHARS = 1 << 16


class Tokenizer:
  """The interface every tokenizer implements."""

  name: str
  vocab_size: int
  eos_id: int
  sep_id: int
  pad_id: int

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` (no specials added), int32 [num_tokens]."""
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each token stands for, int64 [vocab_size]; 0 for specials."""
    raise NotImplementedError

  def to_json(self) -> str:
    """The serialisation that `load_tokenizer(path)` restores."""
    raise NotImplementedError

  def save(self, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(self.to_json(), encoding="utf-8")
    tmp.replace(path)

  def fingerprint(self) -> str:
    """A hash of the serialisation: token caches are keyed by it."""
    return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

  def max_text_id(self) -> int:
    """The largest id `encode` can return (appended specials never come out of text)."""
    return self.vocab_size - 1

  def token_dtype(self) -> np.dtype:
    """The narrowest unsigned dtype holding every id `encode` returns: what a token cache stores
    (eos is never stored, packing inserts it). Bytes: uint8; up to 65,536 ids: uint16; else uint32."""
    for dt in (np.uint8, np.uint16, np.uint32):
      if self.max_text_id() <= np.iinfo(dt).max:
        return np.dtype(dt)
    raise ValueError(f"vocab_size={self.vocab_size} does not fit uint32")


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: ids 0..255 are the bytes; 256 = eos, 257 = sep, 258 = pad."""

  def __init__(self):
    self.name = "bytes"
    self.vocab_size = 259
    self.eos_id, self.sep_id, self.pad_id = 256, 257, 258

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

  def token_bytes(self) -> np.ndarray:
    out = np.ones(self.vocab_size, np.int64)
    out[256:] = 0
    return out

  def to_json(self) -> str:
    return json.dumps({"format": _BYTES_FORMAT})

  def max_text_id(self) -> int:
    return 255


def _byte_level_alphabet() -> dict[str, int]:
  """Byte-level BPE's printable stand-in character for each byte, inverted (char -> byte).

  Printable Latin-1 bytes stand for themselves; the other 68 bytes map, in byte order, to the
  code points from 256 upwards. This is the fixed table all byte-level BPE files use.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  keep = set(printable)
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[chr(b)] = b
    else:
      out[chr(256 + extra)] = b
      extra += 1
  return out


def _is_byte_level(spec: dict[str, Any]) -> bool:
  dec = spec.get("decoder") or {}
  if dec.get("type") == "ByteLevel":
    return True
  return any(d.get("type") == "ByteLevel" for d in dec.get("decoders", []) or [])


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer`, with eos/sep/pad found among its tokens or appended after them."""

  def __init__(self, tok: Any, name: str):
    self._tok = tok
    # Literal "<|endoftext|>" inside a document is text, not a document boundary.
    tok.encode_special_tokens = True
    self.name = name
    self._spec = json.loads(tok.to_str())
    base = tok.get_vocab_size(with_added_tokens=True)
    ids: dict[str, int] = {}
    extra = 0
    for role, names in _SPECIAL_CANDIDATES.items():
      found = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
      if found is None:
        found, extra = base + extra, extra + 1
      ids[role] = found
    self.eos_id, self.sep_id, self.pad_id = ids["eos"], ids["sep"], ids["pad"]
    self._base_vocab = base
    self.vocab_size = base + extra

  def max_text_id(self) -> int:
    return self._base_vocab - 1

  @property
  def hf(self) -> Any:
    return self._tok

  def _pieces(self, text: str) -> list[str]:
    if len(text) <= _PIECE_CHARS:
      return [text]
    pieces, start = [], 0
    for m in re.finditer(r"\n(?=\S)", text):
      if m.end() - start >= _PIECE_CHARS:
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces

  def encode(self, text: str) -> np.ndarray:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    pieces, owner = [], []
    for i, t in enumerate(texts):
      for p in self._pieces(t):
        pieces.append(p)
        owner.append(i)
    encs = self._tok.encode_batch_fast(pieces, add_special_tokens=False)
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    for i, e in zip(owner, encs, strict=True):
      parts[i].append(np.asarray(e.ids, np.int32))
    return [np.concatenate(p) if len(p) > 1 else (p[0] if p else np.zeros(0, np.int32))
            for p in parts]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) < self._base_vocab],
                            skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int64)
    special = {a["id"] for a in self._spec.get("added_tokens", []) if a.get("special")}
    added = {a["id"]: a["content"] for a in self._spec.get("added_tokens", [])}
    if _is_byte_level(self._spec):
      alphabet = _byte_level_alphabet()
      for token, i in self._tok.get_vocab(with_added_tokens=False).items():
        # One stand-in character per byte; anything else would be a malformed file.
        out[i] = len(token) if all(c in alphabet for c in token) else len(token.encode("utf-8"))
    else:
      # Not byte-level: decode each token alone (approximate where a token is part of a
      # multi-byte character).
      for i in range(self._base_vocab):
        out[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    for i, content in added.items():
      out[i] = 0 if i in special else len(content.encode("utf-8"))
    return out

  def to_json(self) -> str:
    return self._tok.to_str()


def _hf_from_file(path: Path, name: str) -> HFTokenizer:
  from tokenizers import Tokenizer as HFTok
  try:
    return HFTokenizer(HFTok.from_file(str(path)), name)
  except Exception as e:  # the Rust side raises its own exception type
    raise ValueError(f"{path}: not a `tokenizers` JSON file ({e})") from None


def load_tokenizer_file(path: Path, name: str) -> Tokenizer:
  """The tokenizer in file or folder `path`, called `name` (caches are keyed by name and hash)."""
  return _from_path(path, name)


def _from_path(path: Path, name: str) -> Tokenizer:
  path = Path(path)
  if path.is_file():
    text = path.read_text(encoding="utf-8")
    if _BYTES_FORMAT in text[:100]:
      return ByteTokenizer()
    return _hf_from_file(path, name)
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      return _hf_from_file(path / "tokenizer.json", name)
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
      if (path / vocab).is_file() and (path / merges).is_file():
        from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers
        tok = HFTok(models.BPE.from_file(str(path / vocab), str(path / merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOS) is not None:
          tok.add_special_tokens([EOS])
        return HFTokenizer(tok, name)
    jsons = [p for p in sorted(path.glob("*.json"))]
    if len(jsons) == 1:
      return _hf_from_file(jsons[0], name)
  raise ValueError(f"{path}: no tokenizer there (expected a tokenizers JSON file, tokenizer.json, "
                   f"encoder.json + vocab.bpe, or vocab.json + merges.txt)")


def train_bpe(texts: Iterable[str], vocab_size: int, name: str, *, max_bytes: int = 0,
              show_progress: bool = True) -> HFTokenizer:
  """A byte-level BPE tokenizer with `vocab_size` tokens (specials included) trained on `texts`.

  Args:
    texts: documents; read until `max_bytes` UTF-8 bytes (0: all).
    vocab_size: total vocabulary, at least 259 (256 bytes + 3 specials).
  """
  from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
  if vocab_size < 259:
    raise ValueError(f"bpe vocab_size={vocab_size} must be >= 259 (256 bytes + 3 specials)")
  tok = HFTok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                special_tokens=[EOS, SEP, PAD], show_progress=show_progress,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

  def limited() -> Iterator[str]:
    seen = 0
    for t in texts:
      yield t
      seen += len(t.encode("utf-8"))
      if max_bytes and seen >= max_bytes:
        return

  tok.train_from_iterator(limited(), trainer=trainer)
  return HFTokenizer(tok, name)


def _bpe_size(spec: str) -> int | None:
  m = re.fullmatch(r"bpe:(\d+)", spec)
  return int(m.group(1)) if m else None


def load_tokenizer(spec: str, *, cache_dir: str = "", data_dir: str = "", dataset_key: str = "",
                   train_texts: Callable[[], Iterable[str]] | None = None,
                   bpe_train_bytes: int = 0, show_progress: bool = True) -> Tokenizer:
  """The tokenizer `spec` names (see the module docstring).

  Args:
    spec: "bytes", "bpe:<N>", a saved or provided tokenizer's name, or a path.
    dataset_key: the dataset a "bpe:<N>" tokenizer belongs to (its saved name is `<key>-bpe<N>`).
    train_texts: returns the training documents, called only when a "bpe:<N>" must be trained.
    bpe_train_bytes: cap on training text (0: all of it).

  Raises:
    ValueError: unknown name or unreadable file; lists the names that are available.
  """
  if spec == "bytes":
    return ByteTokenizer()
  cache = paths.cache_root(cache_dir) / "tokenizers"
  size = _bpe_size(spec)
  if size is not None:
    if not dataset_key:
      raise ValueError(f"tokenizer {spec!r} needs a dataset to train on")
    name = f"{dataset_key}-bpe{size}"
    saved = cache / f"{name}.json"
    if saved.is_file():
      return _from_path(saved, name)
    if train_texts is None:
      raise ValueError(f"tokenizer {spec!r}: {saved} does not exist and there is no corpus to "
                       f"train it on")
    tok = train_bpe(train_texts(), size, name, max_bytes=bpe_train_bytes,
                    show_progress=show_progress)
    tok.save(saved)
    return _from_path(saved, name)  # reload: the file is what every later run sees
  as_path = Path(spec).expanduser()
  if not paths.is_plain_name(spec) or spec.endswith(".json"):
    if as_path.exists():
      return _from_path(as_path, as_path.stem if as_path.is_file() else as_path.name)
    raise ValueError(f"tokenizer file {as_path} does not exist")
  if (cache / f"{spec}.json").is_file():
    return _from_path(cache / f"{spec}.json", spec)
  root = paths.data_root(data_dir, required=False)
  if root is not None and (root / "tokenizers" / spec).is_dir():
    return _from_path(root / "tokenizers" / spec, spec)
  raise ValueError(f"unknown tokenizer {spec!r}; available: {available_tokenizers(cache_dir, data_dir)}"
                   f" (or 'bytes', 'bpe:<vocab size>', or a path to a tokenizer file)")


def available_tokenizers(cache_dir: str = "", data_dir: str = "") -> list[str]:
  names = ["bytes"]
  cache = paths.cache_root(cache_dir) / "tokenizers"
  if cache.is_dir():
    names += sorted(p.stem for p in cache.glob("*.json"))
  root = paths.data_root(data_dir, required=False)
  if root is not None and (root / "tokenizers").is_dir():
    names += sorted(p.name for p in (root / "tokenizers").iterdir() if p.is_dir())
  return names
