"""Command line for datasets: `python -m ssm_lab.data {list, info, prepare, bm25} ...`.

  list                       the datasets in the data directory and what each one is
  info <dataset>             documents, bytes, words and cached tokens per split (corpora), or
                             documents, queries, judgements and runs per split (ranking collections)
  prepare <dataset>          tokenise a corpus into token caches (progress bar; caps keep caches small
                             enough to carry to the GPU machine), or build a collection's BM25 cache
  bm25 <dataset>             BM25 alone on every judged split: MRR@10, nDCG@10, MAP, R@100; --out
                             writes the TREC run

<dataset> is a folder name of the data directory (`--data_dir`, else $SSM_LAB_DATA_DIR, else
../shared/data) or a path. Caches go to `--cache_dir`, else $SSM_LAB_CACHE_DIR, else ~/.cache/ssm_lab.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from ssm_lab.data import paths


def _human(n: float) -> str:
  for unit in ("", "K", "M", "G", "T"):
    if abs(n) < 1000:
      return f"{n:.3g}{unit}"
    n /= 1000
  return f"{n:.3g}P"


def _kind(folder: Path) -> str:
  from ssm_lab.data import text
  from ssm_lab.data.ranking import formats
  layout = formats.detect_layout(folder)
  if layout:
    return f"ranking collection ({layout} layout)"
  try:
    corpus = text.find_corpus(folder)
  except ValueError:
    return "unknown (no recognised files)"
  return f"text corpus (splits {corpus.splits})"


def cmd_list(args: argparse.Namespace) -> None:
  root = paths.data_root(args.data_dir)
  print(f"data directory: {root}")
  for name in paths.available_datasets(root):
    print(f"  {name:24s} {_kind(root / name)}")
  from ssm_lab.data.tokenizer import available_tokenizers
  print(f"tokenizers: {available_tokenizers(args.cache_dir, args.data_dir)} (and bpe:<vocab size>)")


def _corpus_info(args: argparse.Namespace, folder: Path) -> None:
  from ssm_lab.data import text, token_cache
  corpus = text.find_corpus(folder, paths.dataset_key(args.dataset), args.text_field, args.doc_split)
  tok = None
  if args.tokenizer:
    from ssm_lab.data.lm import get_tokenizer
    tok = get_tokenizer(args.tokenizer, args.dataset, data_dir=args.data_dir,
                        cache_dir=args.cache_dir, corpus=corpus)
  print(f"{folder}: text corpus, splits {corpus.splits}")
  print(f"  {'split':6s} {'files':>5s} {'documents':>10s} {'UTF-8 bytes':>12s} {'words':>10s}"
        + (f" {'tokens (' + tok.name + ')':>20s}" if tok else ""))
  for split in corpus.splits:
    docs = nbytes = words = ntok = 0
    for d in corpus.documents(split):
      docs += 1
      nbytes += len(d.encode("utf-8"))
      words += len(d.split())
      if tok is not None:
        ntok += len(tok.encode(d))
    print(f"  {split:6s} {len(corpus.files[split]):5d} {docs:10,d} {nbytes:12,d} {words:10,d}"
          + (f" {ntok:20,d}" if tok else ""))
  caches = token_cache.find_caches(args.cache_dir, paths.dataset_key(args.dataset))
  print(f"token caches under {paths.cache_root(args.cache_dir) / 'tokens'}: "
        f"{'none (python -m ssm_lab.data prepare ...)' if not caches else ''}")
  for c in caches:
    meta = token_cache.TokenCache.open(c).meta
    size = (c / "tokens.bin").stat().st_size
    print(f"  {c.parent.name}/{c.name}: {meta['num_tokens']:,d} tokens ({meta['dtype']}, "
          f"{_human(size)}B on disk), {meta['num_docs']:,d} documents, {meta['text_bytes']:,d} "
          f"bytes of text ({meta['text_bytes'] / max(meta['num_tokens'], 1):.2f} bytes/token)")


def _collection_info(args: argparse.Namespace) -> None:
  from ssm_lab.data.ranking import formats, splits
  c = formats.load_collection(args.dataset, args.data_dir, args.layout)
  words = sum(len(t.split()) for t in c.docs.values())
  print(f"{c.root}: ranking collection, {c.layout} layout")
  print(f"  documents {len(c.docs):,d} (mean {words / max(len(c.docs), 1):.1f} words), queries "
        f"{len(c.queries):,d}")
  print(f"  {'split':10s} {'queries':>8s} {'judgements':>10s}  grades")
  for s in c.splits:
    q = c.qrels[s]
    grades = collections.Counter(g for docs in q.values() for g in docs.values())
    print(f"  {s:10s} {len(q):8,d} {sum(len(d) for d in q.values()):10,d}  "
          f"{dict(sorted(grades.items()))}")
  for name, run in c.runs.items():
    print(f"  run {name}: {len(run)} queries, {sum(len(d) for d in run.values()):,d} entries")
  if c.candidates:
    n = sum(len(v) for s in c.candidates.values() for v in s.values())
    print(f"  per-query candidate lists (re-rank these): {n:,d} candidates")
  sp = splits.make_splits(c)
  print(f"  training protocol: {sp.protocol} -> train {len(sp.train)}, dev {len(sp.dev)}, test "
        f"{len(sp.test)} queries")


def cmd_info(args: argparse.Namespace) -> None:
  from ssm_lab.data.ranking import formats
  folder = paths.resolve_dataset(args.dataset, args.data_dir)
  if formats.detect_layout(folder) and args.layout != "text":
    _collection_info(args)
  else:
    _corpus_info(args, folder)


def cmd_prepare(args: argparse.Namespace) -> None:
  from ssm_lab.data import lm
  from ssm_lab.data.ranking import formats
  folder = paths.resolve_dataset(args.dataset, args.data_dir)
  if formats.detect_layout(folder) and args.layout != "text":
    from ssm_lab.data.ranking import bm25
    from ssm_lab.data.tokenizer import load_tokenizer
    c = formats.load_collection(args.dataset, args.data_dir, args.layout)
    run = bm25.first_stage_run(c, args.k, bm25.BM25Params(k1=args.k1, b=args.b), args.cache_dir)
    print(f"BM25 top-{args.k} of {len(run)} queries cached under "
          f"{paths.cache_root(args.cache_dir) / 'bm25'}")
    tok = load_tokenizer(args.tokenizer, cache_dir=args.cache_dir, data_dir=args.data_dir,
                         dataset_key=c.name, train_texts=lambda: iter(c.docs.values()),
                         bpe_train_bytes=args.bpe_train_bytes)
    print(f"tokenizer {tok.name}: {tok.vocab_size} tokens")
    return
  corpus = lm.open_corpus(args.dataset, args.data_dir, args.text_field, args.doc_split)
  tok = lm.get_tokenizer(args.tokenizer, args.dataset, data_dir=args.data_dir,
                         cache_dir=args.cache_dir, corpus=corpus,
                         bpe_train_bytes=args.bpe_train_bytes)
  split_names = args.splits.split(",") if args.splits else corpus.splits
  total = 0
  for split in split_names:
    cap = args.max_tokens if split == "train" else args.eval_tokens
    cache = lm.prepare_split(corpus, args.dataset, split, tok, cache_dir=args.cache_dir,
                             max_tokens=cap, cap_mode="prefix" if split == "train" else "spread")
    size = (cache.path / "tokens.bin").stat().st_size
    total += size
    print(f"{split}: {cache.num_tokens:,d} tokens in {cache.num_docs:,d} documents "
          f"({cache.meta['dtype']}, {_human(size)}B) -> {cache.path}")
  print(f"total {_human(total)}B. Task fields: dataset={args.dataset!r}, tokenizer={args.tokenizer!r}, "
        f"train_tokens={args.max_tokens}, eval_tokens={args.eval_tokens}"
        + (f", cache_dir={args.cache_dir!r}" if args.cache_dir else ""))


def cmd_bm25(args: argparse.Namespace) -> None:
  from ssm_lab.data.ranking import bm25, formats, metrics
  c = formats.load_collection(args.dataset, args.data_dir, args.layout)
  params = bm25.BM25Params(k1=args.k1, b=args.b)
  run = bm25.first_stage_run(c, args.k, params, args.cache_dir)
  print(f"BM25 ({params.tag()}, top {args.k}) on {c.name}; binary measures count grade >= "
        f"{args.rel} as relevant")
  print(f"  {'split':10s} {'queries':>7s} " + " ".join(f"{n:>8s}" for n in metrics.NAMES))
  for s in ([args.split] if args.split else c.splits):
    if s not in c.qrels:
      raise ValueError(f"{c.name} has no split {s!r}; it has {c.splits}")
    qids = sorted(q for q, d in c.qrels[s].items() if any(g >= args.rel for g in d.values()))
    m = metrics.evaluate_run(run, c.qrels[s], args.rel, qids)
    print(f"  {s:10s} {int(m['num_queries']):7d} "
          + " ".join(f"{m[n]:8.4f}" for n in metrics.NAMES))
  if args.out:
    formats.write_trec_run(run, Path(args.out), tag="bm25")
    print(f"run written to {args.out}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ssm_lab.data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", default="", help="folder of datasets (default: see above)")
    p.add_argument("--cache_dir", default="", help="cache folder (default: see above)")

  p = sub.add_parser("list", help="datasets in the data directory")
  common(p)
  p.set_defaults(fn=cmd_list)
  for name, fn, text_help in (("info", cmd_info, "what a dataset holds"),
                              ("prepare", cmd_prepare, "build token caches / BM25 caches"),
                              ("bm25", cmd_bm25, "BM25 baseline metrics")):
    p = sub.add_parser(name, help=text_help)
    p.add_argument("dataset")
    common(p)
    p.add_argument("--layout", default="auto",
                   help="ranking layout (auto, beir, msmarco, trec, wikiqa) or 'text'")
    if name in ("prepare", "bm25"):
      p.add_argument("--k1", type=float, default=0.9, help="BM25 k1")
      p.add_argument("--b", type=float, default=0.4, help="BM25 b")
      p.add_argument("--k", type=int, default=1000, help="BM25 depth (documents per query)")
    if name in ("info", "prepare"):
      p.add_argument("--text_field", default="text", help="JSONL field holding the text")
      p.add_argument("--doc_split", default="auto", help="auto, file, line, blank, wikitext")
      p.add_argument("--tokenizer", default="bytes" if name == "prepare" else "",
                     help="bytes, bpe:<N>, gpt2, gpt-neox-20b, a saved name or a path"
                     + ("; info: also count tokens with it" if name == "info" else ""))
      p.add_argument("--bpe_train_bytes", type=int, default=32 << 20)
    if name == "prepare":
      p.add_argument("--splits", default="", help="comma-separated (default: all)")
      p.add_argument("--max_tokens", type=int, default=0,
                     help="cap on train tokens (a prefix of the split); 0: all")
      p.add_argument("--eval_tokens", type=int, default=0,
                     help="cap on tokens of every other split (the middle of each document); 0: all")
    if name == "bm25":
      p.add_argument("--split", default="", help="one split (default: every judged split)")
      p.add_argument("--rel", type=int, default=1, help="lowest relevant grade (TREC DL: 2)")
      p.add_argument("--out", default="", help="write the run as a TREC file")
    p.set_defaults(fn=fn)
  from ssm_lab import cli
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(cli.strip_verbose(argv))
  # One line naming the file or field; the traceback only with --verbose.
  cli.run("ssm_lab.data", lambda: args.fn(args), argv=argv)


if __name__ == "__main__":
  main()
