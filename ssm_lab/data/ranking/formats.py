"""Ranking collections in their standard layouts, read into one `Collection`.

Layouts (detected from the folder, or named with the task field `layout`):

  "beir"     corpus.jsonl (`_id`, `title`, `text`), queries.jsonl (`_id`, `text`), qrels/<split>.tsv
             (`query-id corpus-id score`, header optional). Thakur et al. 2021.
  "msmarco"  collection.tsv (`pid<TAB>text`), queries.<split>.tsv (`qid<TAB>text`), qrels.<split>.tsv
             (`qid 0 pid grade`), optional run.<split>.tsv (`qid<TAB>pid<TAB>rank`) and
             top1000.<split>.tsv (`qid<TAB>pid<TAB>query<TAB>passage`). Bajaj et al. 2016.
  "trec"     SGML documents (`<DOC><DOCNO>id</DOCNO> text </DOC>`), topics (`<top><num>id</num>
             <title>text</title>...</top>`, closing tags optional), qrels (`qid iter docid grade`) and
             runs (`qid Q0 docid rank score tag`), recognised by content; a qrels file's split is
             the split word in its name, else "test".
  "wikiqa"   <split>/{a.toks, b.toks, id.txt, sim.txt}: line i is one (question, candidate sentence,
             question id, label) pair (Yang et al. 2015). Each question's candidates are its own
             documents; query ids become "<split>-<id>".

Any layout may also hold TREC run files (`*.trec`, `*.run`): they become named candidate lists
(`runs`), e.g. a first-stage ranking to re-rank. Every reader names the file and line of a malformed
entry. Text files may be compressed (.gz/.xz/.bz2).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

from ssm_lab.data import paths
from ssm_lab.data.text import SPLIT_ALIASES, open_text, strip_compression

Qrels = dict[str, dict[str, int]]         # qid -> docid -> grade
Run = dict[str, dict[str, float]]          # qid -> docid -> score
LAYOUTS = ("auto", "beir", "msmarco", "trec", "wikiqa")


@dataclasses.dataclass
class Collection:
  """Documents, queries, judgements by split, and provided candidate lists of one collection."""

  name: str
  root: Path
  layout: str
  docs: dict[str, str]
  queries: dict[str, str]
  qrels: dict[str, Qrels]
  runs: dict[str, Run] = dataclasses.field(default_factory=dict)
  # Per-split candidate lists that come with the data (WikiQA), in their given order.
  candidates: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)

  @property
  def splits(self) -> list[str]:
    order = {"train": 0, "dev": 1, "valid": 1, "test": 2}
    return sorted(self.qrels, key=lambda s: (order.get(s, 3), s))

  def fingerprint(self) -> str:
    return paths.files_fingerprint(paths.data_files(self.root), self.root)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
  with open_text(path) as f:
    for i, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if line.strip():
        yield i, line


def _bad(path: Path, line_no: int, what: str) -> ValueError:
  return ValueError(f"{path}:{line_no}: {what}")


def _grade(path: Path, line_no: int, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    pass
  try:
    as_float = float(value)
  except ValueError:
    as_float = float("nan")
  if not as_float.is_integer():
    raise _bad(path, line_no, f"relevance grade {value!r} is not an integer")
  return int(as_float)


def read_jsonl_records(path: Path, id_field: str, text_fields: tuple[str, ...]) -> dict[str, str]:
  """{id: text} from a JSONL file; texts of several fields (title, text) are joined by a space."""
  out: dict[str, str] = {}
  for line_no, line in _lines(path):
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise _bad(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or id_field not in obj or text_fields[-1] not in obj:
      got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise _bad(path, line_no, f"expected a JSON object with {id_field!r} and "
                                f"{text_fields[-1]!r}; got {got}")
    parts = [str(obj.get(f) or "").strip() for f in text_fields]
    out[str(obj[id_field])] = " ".join(p for p in parts if p)
  return out


def read_tsv_pairs(path: Path) -> dict[str, str]:
  """{id: text} from `id<TAB>text` lines."""
  out = {}
  for line_no, line in _lines(path):
    parts = line.split("\t")
    if len(parts) < 2:
      raise _bad(path, line_no, f"expected 'id<TAB>text', got {len(parts)} column(s): {line[:80]!r}")
    out[parts[0].strip()] = "\t".join(parts[1:]).strip()
  return out


def read_qrels(path: Path) -> Qrels:
  """TREC qrels (`qid iter docid grade`) or BEIR qrels (`query-id corpus-id score`, header optional)."""
  out: Qrels = {}
  for line_no, line in _lines(path):
    parts = line.split()
    if line_no == 1 and parts[0].lower() in ("query-id", "query_id", "qid", "topic"):
      continue  # a header line (BEIR: query-id corpus-id score)
    if len(parts) == 4:
      qid, _, docid, grade = parts
    elif len(parts) == 3:
      qid, docid, grade = parts
    else:
      raise _bad(path, line_no, f"expected 'qid iter docid grade' (TREC) or 'qid docid grade' "
                                f"(BEIR), got {len(parts)} columns: {line[:80]!r}")
    out.setdefault(qid, {})[docid] = _grade(path, line_no, grade)
  return out


def read_trec_run(path: Path) -> Run:
  """A TREC run file: `qid Q0 docid rank score tag`."""
  out: Run = {}
  for line_no, line in _lines(path):
    parts = line.split()
    if len(parts) != 6:
      raise _bad(path, line_no, f"expected 'qid Q0 docid rank score tag' (6 columns), got "
                                f"{len(parts)}: {line[:80]!r}")
    try:
      score = float(parts[4])
    except ValueError:
      raise _bad(path, line_no, f"score {parts[4]!r} is not a number") from None
    out.setdefault(parts[0], {})[parts[2]] = score
  return out


def write_trec_run(run: Run, path: Path, tag: str = "ssm_lab") -> None:
  """Writes `run` as a TREC run file, each query's documents by decreasing score (ties: doc id)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for qid in sorted(run):
      ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))
      for rank, (docid, score) in enumerate(ranked, 1):
        f.write(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n")


def read_msmarco_run(path: Path) -> Run:
  """An MS MARCO run (`qid<TAB>pid<TAB>rank`): scores are minus ranks, so higher is better."""
  out: Run = {}
  for line_no, line in _lines(path):
    parts = line.split()
    if len(parts) != 3 or not parts[2].isdigit():
      raise _bad(path, line_no, f"expected 'qid<TAB>pid<TAB>rank', got {line[:80]!r}")
    out.setdefault(parts[0], {})[parts[1]] = -float(parts[2])
  return out


# --- TREC SGML -------------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]+>")


def read_trec_docs(path: Path) -> dict[str, str]:
  """Documents of a TREC SGML file: DOCNO is the id, the rest with tags removed is the text."""
  out: dict[str, str] = {}
  buf: list[str] | None = None
  start = 0
  with open_text(path) as f:
    for line_no, line in enumerate(f, 1):
      upper = line.upper()
      if "<DOC>" in upper:
        if buf is not None:
          raise _bad(path, line_no, f"<DOC> opened before the <DOC> of line {start} was closed")
        buf, start = [], line_no
        line = line[upper.index("<DOC>") + 5:]
        upper = line.upper()
      if buf is None:
        if line.strip():
          raise _bad(path, line_no, f"text outside <DOC> ... </DOC>: {line.strip()[:60]!r}")
        continue
      if "</DOC>" in upper:
        buf.append(line[:upper.index("</DOC>")])
        body = "".join(buf)
        m = re.search(r"<DOCNO>\s*(.*?)\s*</DOCNO>", body, re.I | re.S)
        if not m:
          raise _bad(path, start, "document without <DOCNO>...</DOCNO>")
        text = _TAG.sub(" ", body[:m.start()] + body[m.end():])
        out[m.group(1)] = " ".join(text.split())
        buf = None
      else:
        buf.append(line)
  if buf is not None:
    raise _bad(path, start, "<DOC> never closed")
  return out


def read_trec_topics(path: Path, field: str = "title") -> dict[str, str]:
  """Topics of a TREC topic file: {num: the `field` text} ("Number:"/"Topic:" prefixes removed)."""
  with open_text(path) as f:
    raw = f.read()
  out: dict[str, str] = {}
  for m in re.finditer(r"<top>(.*?)</top>", raw, re.I | re.S):
    block = m.group(1)
    line_no = raw.count("\n", 0, m.start()) + 1
    num = re.search(r"<num>\s*(?:Number:)?\s*([^<\s]+)", block, re.I)
    if not num:
      raise _bad(path, line_no, "topic without <num>")
    # A field runs to its closing tag or, in the old format without closing tags, the next tag.
    text = re.search(rf"<{field}>(.*?)(?=<)", block + "<", re.I | re.S)
    if not text:
      raise _bad(path, line_no, f"topic {num.group(1)} has no <{field}>")
    value = re.sub(r"^\s*(Topic|Description|Narrative):", "", text.group(1), flags=re.I)
    out[num.group(1)] = " ".join(value.split())
  if not out:
    raise ValueError(f"{path}: no <top> ... </top> topics found")
  return out


def sniff(path: Path) -> str | None:
  """"trec_docs", "trec_topics", "trec_run", "trec_qrels" or None, from a file's first lines."""
  try:
    with open_text(path) as f:
      head = f.read(4096)
  except (UnicodeDecodeError, OSError, EOFError):
    return None
  first = next((ln for ln in head.splitlines() if ln.strip()), "")
  # SGML files open with their first tag; text that merely mentions "<doc>" is not one.
  opening = first.lstrip().upper()
  if opening.startswith("<DOC>"):
    return "trec_docs"
  if opening.startswith("<TOP>"):
    return "trec_topics"
  parts = first.split()
  if len(parts) == 6 and parts[1].upper() == "Q0":
    return "trec_run"
  if len(parts) == 4 and parts[3].lstrip("-").isdigit():
    return "trec_qrels"
  return None


def _split_name(path: Path, default: str) -> str:
  stem = strip_compression(path.name)
  for token in re.split(r"[^A-Za-z]+", stem.lower()):
    if token in SPLIT_ALIASES:
      return "dev" if SPLIT_ALIASES[token] == "valid" else SPLIT_ALIASES[token]
  return default


def _find(root: Path, name: str) -> Path | None:
  for suffix in ("", ".gz", ".xz", ".bz2"):
    if (root / (name + suffix)).is_file():
      return root / (name + suffix)
  return None


def _extra_runs(root: Path, skip: set[Path]) -> dict[str, Run]:
  runs = {}
  for p in paths.data_files(root):
    if p in skip or p.parent != root:
      continue
    if strip_compression(p.name).endswith((".trec", ".run")) and sniff(p) == "trec_run":
      runs[Path(strip_compression(p.name)).stem] = read_trec_run(p)
  return runs


def load_beir(root: Path, name: str) -> Collection:
  corpus, queries = _find(root, "corpus.jsonl"), _find(root, "queries.jsonl")
  if corpus is None or queries is None:
    raise ValueError(f"{root}: the BEIR layout needs corpus.jsonl and queries.jsonl")
  qrels = {}
  for p in sorted((root / "qrels").glob("*.tsv*")) if (root / "qrels").is_dir() else []:
    split = Path(strip_compression(p.name)).stem
    qrels[{"valid": "dev", "validation": "dev"}.get(split, split)] = read_qrels(p)
  if not qrels:
    raise ValueError(f"{root}: the BEIR layout needs qrels/<split>.tsv files; none found")
  return Collection(name=name, root=root, layout="beir",
                    docs=read_jsonl_records(corpus, "_id", ("title", "text")),
                    queries=read_jsonl_records(queries, "_id", ("text",)), qrels=qrels,
                    runs=_extra_runs(root, set()))


def load_msmarco(root: Path, name: str) -> Collection:
  coll = _find(root, "collection.tsv")
  if coll is None:
    raise ValueError(f"{root}: the MS MARCO layout needs collection.tsv")
  docs = read_tsv_pairs(coll)
  queries: dict[str, str] = {}
  qrels: dict[str, Qrels] = {}
  runs: dict[str, Run] = {}
  for p in paths.data_files(root):
    if p.parent != root:
      continue
    parts = strip_compression(p.name).split(".")
    if len(parts) < 3 or parts[-1] not in ("tsv", "txt"):
      continue
    kind, split = parts[0], ".".join(parts[1:-1])
    if kind == "queries":
      queries.update(read_tsv_pairs(p))
    elif kind == "qrels":
      qrels[split] = read_qrels(p)
    elif kind == "run":
      runs[f"run.{split}"] = read_msmarco_run(p)
    elif kind == "top1000":
      run: Run = {}
      for line_no, line in _lines(p):
        cols = line.split("\t")
        if len(cols) != 4:
          raise _bad(p, line_no, f"expected 'qid<TAB>pid<TAB>query<TAB>passage', got "
                                 f"{len(cols)} columns")
        qid, pid, query, passage = cols
        queries.setdefault(qid, query.strip())
        docs.setdefault(pid, passage.strip())
        ranked = run.setdefault(qid, {})
        ranked[pid] = -float(len(ranked) + 1)  # file order is the ranking
      runs[f"top1000.{split}"] = run
  if not qrels:
    raise ValueError(f"{root}: the MS MARCO layout needs qrels.<split>.tsv files; none found")
  runs.update(_extra_runs(root, set()))
  return Collection(name=name, root=root, layout="msmarco", docs=docs, queries=queries, qrels=qrels,
                    runs=runs)


def load_trec(root: Path, name: str, topic_field: str = "title") -> Collection:
  docs: dict[str, str] = {}
  queries: dict[str, str] = {}
  qrels: dict[str, Qrels] = {}
  runs: dict[str, Run] = {}
  for p in paths.data_files(root):
    kind = sniff(p)
    if kind == "trec_docs":
      docs.update(read_trec_docs(p))
    elif kind == "trec_topics":
      queries.update(read_trec_topics(p, topic_field))
    elif kind == "trec_qrels":
      split = _split_name(p, "test")
      for qid, judged in read_qrels(p).items():
        qrels.setdefault(split, {}).setdefault(qid, {}).update(judged)
    elif kind == "trec_run":
      runs[Path(strip_compression(p.name)).stem] = read_trec_run(p)
  missing = [what for what, got in (("documents", docs), ("topics", queries), ("qrels", qrels))
             if not got]
  if missing:
    raise ValueError(f"{root}: the TREC layout needs SGML documents, topics and qrels; found no "
                     f"{missing}")
  return Collection(name=name, root=root, layout="trec", docs=docs, queries=queries, qrels=qrels,
                    runs=runs)


def load_wikiqa(root: Path, name: str) -> Collection:
  docs: dict[str, str] = {}
  queries: dict[str, str] = {}
  qrels: dict[str, Qrels] = {}
  candidates: dict[str, dict[str, list[str]]] = {}
  for folder in sorted(p for p in root.iterdir() if (p / "a.toks").is_file()):
    split = folder.name
    split = {"valid": "dev", "validation": "dev"}.get(split, split)
    files = {n: folder / n for n in ("a.toks", "b.toks", "id.txt", "sim.txt")}
    for n, f in files.items():
      if not f.is_file():
        raise ValueError(f"{folder}: the WikiQA layout needs {list(files)}; {n} is missing")
    cols = {}
    for n, f in files.items():
      with open_text(f) as fh:
        cols[n] = fh.read().splitlines()
    lengths = {n: len(v) for n, v in cols.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"{folder}: a.toks, b.toks, id.txt and sim.txt must have the same number of "
                       f"lines, got {lengths}")
    count: dict[str, int] = {}
    for i, (q, d, qid, label) in enumerate(zip(*(cols[n] for n in files), strict=True), 1):
      if label.strip() not in ("0", "1"):
        raise _bad(files["sim.txt"], i, f"label {label!r} is not 0 or 1")
      if not qid.strip():
        raise _bad(files["id.txt"], i, "empty question id")
      key = f"{split}-{qid.strip()}"
      j = count.get(key, 0)
      count[key] = j + 1
      docid = f"{key}-{j}"
      queries[key] = q.strip()
      docs[docid] = d.strip()
      qrels.setdefault(split, {}).setdefault(key, {})[docid] = int(label)
      candidates.setdefault(split, {}).setdefault(key, []).append(docid)
  if not qrels:
    raise ValueError(f"{root}: the WikiQA layout needs <split>/a.toks, b.toks, id.txt, sim.txt")
  return Collection(name=name, root=root, layout="wikiqa", docs=docs, queries=queries, qrels=qrels,
                    candidates=candidates)


def detect_layout(root: Path) -> str | None:
  if any((p / "a.toks").is_file() for p in root.iterdir() if p.is_dir()):
    return "wikiqa"
  if _find(root, "corpus.jsonl"):
    return "beir"
  if _find(root, "collection.tsv"):
    return "msmarco"
  if any(sniff(p) == "trec_docs" for p in paths.data_files(root)):
    return "trec"
  return None


def load_collection(dataset: str, data_dir: str = "", layout: str = "auto",
                    topic_field: str = "title") -> Collection:
  """The collection `dataset` (a data-directory name or a path) in `layout` ("auto": detect).

  Raises:
    ValueError: unknown dataset (lists those available), unknown layout, or malformed files.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} must be one of {list(LAYOUTS)}")
  root = paths.resolve_dataset(dataset, data_dir)
  name = paths.dataset_key(dataset)
  found = detect_layout(root) if layout == "auto" else layout
  if found is None:
    present = [str(p.relative_to(root)) for p in paths.data_files(root)][:20]
    raise ValueError(f"{root} is not a ranking collection in a known layout (beir: corpus.jsonl + "
                     f"queries.jsonl + qrels/; msmarco: collection.tsv + queries/qrels.<split>.tsv; "
                     f"trec: SGML documents + topics + qrels; wikiqa: <split>/a.toks ...); files: "
                     f"{present}")
  if found == "beir":
    return load_beir(root, name)
  if found == "msmarco":
    return load_msmarco(root, name)
  if found == "trec":
    return load_trec(root, name, topic_field)
  return load_wikiqa(root, name)
