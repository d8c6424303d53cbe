"""Re-rank a first-stage TREC run with a cross-encoder and write a TREC run.

  python -m ssm_lab.rank --checkpoint DIR --queries Q --corpus C --run BM25.trec --out RUN.trec \\
      [--qrels QRELS] [--interpolate W] [--depth 100] [--rel 1] [--batch_size 64]
  python -m ssm_lab.rank --from_pretrained HF_DIR --tokenizer TOK ...   (instead of --checkpoint)

--checkpoint: an ssm_lab run directory whose model has a classifier head (written by
ssm_lab.train with a ranking config, e.g. fine-tuned from a backbone with train.init_from). --from_pretrained: a Hugging Face directory whose safetensors
hold the backbone and a linear head `score.weight` (EOS pooling; see ssm_lab/rank/scorer.py), with
--tokenizer naming its tokenizer (a file, folder or a name such as gpt-neox-20b).
--queries: BEIR queries.jsonl, TREC topics, or `qid<TAB>text`. --corpus: BEIR corpus.jsonl, TREC
SGML documents, or `docid<TAB>text`. --run: TREC run (`qid Q0 docid rank score tag`).
--qrels (TREC or BEIR): prints MRR@10, nDCG@10, MAP and R@100 of the first stage and the re-ranking
(ir-measures; --rel is the lowest relevant grade for the binary ones, 2 for TREC DL).
--interpolate W: the written run is W * reranker + (1 - W) * first stage (min-max normalised per
query); metrics of both are printed. Files may be compressed (.gz, .xz, .bz2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ssm_lab.data.ranking import formats


def read_texts(path: str, what: str) -> dict[str, str]:
  """{id: text} from a BEIR JSONL, TREC SGML documents or topics, or `id<TAB>text` lines."""
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"--{what} {path}: no such file")
  kind = formats.sniff(p)
  if kind == "trec_docs":
    return formats.read_trec_docs(p)
  if kind == "trec_topics":
    return formats.read_trec_topics(p)
  name = formats.strip_compression(p.name)
  if name.endswith((".jsonl", ".json")):
    fields = ("title", "text") if what == "corpus" else ("text",)
    return formats.read_jsonl_records(p, "_id", fields)
  return formats.read_tsv_pairs(p)


def _file(path: str, flag: str) -> Path:
  if not Path(path).is_file():
    raise FileNotFoundError(f"{flag} {path}: no such file")
  return Path(path)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ssm_lab.rank", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="ssm_lab run directory with a classifier head")
  src.add_argument("--from_pretrained", help="Hugging Face directory with a score.weight head")
  parser.add_argument("--tokenizer", default="", help="with --from_pretrained: its tokenizer")
  parser.add_argument("--queries", required=True)
  parser.add_argument("--corpus", required=True)
  parser.add_argument("--run", required=True, help="first-stage TREC run to re-rank")
  parser.add_argument("--out", required=True, help="TREC run to write")
  parser.add_argument("--qrels", help="judgements: print metrics")
  parser.add_argument("--interpolate", type=float, default=None, metavar="W",
                      help="write W * reranker + (1 - W) * first stage")
  parser.add_argument("--depth", type=int, default=100, help="documents per query to re-rank")
  parser.add_argument("--rel", type=int, default=1, help="lowest relevant grade (TREC DL: 2)")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--seq_len", type=int, default=512, help="with --from_pretrained")
  parser.add_argument("--tag", default="ssm_lab-rank")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    if args.interpolate is not None and not 0.0 <= args.interpolate <= 1.0:
      raise ValueError(f"--interpolate {args.interpolate}: must be in [0, 1]")
    queries = read_texts(args.queries, "queries")
    docs = read_texts(args.corpus, "corpus")
    first = formats.read_trec_run(_file(args.run, "--run"))
    qrels = formats.read_qrels(_file(args.qrels, "--qrels")) if args.qrels else None
    from ssm_lab.rank import reranking as rr  # noqa: PLC0415 (imports JAX: after the cheap checks)
    from ssm_lab.rank.scorer import Scorer  # noqa: PLC0415

    if args.checkpoint:
      scorer = Scorer.from_workdir(args.checkpoint, batch_size=args.batch_size)
    else:
      if not args.tokenizer:
        raise ValueError("--from_pretrained needs --tokenizer")
      scorer = Scorer.from_pretrained(args.from_pretrained, args.tokenizer, seq_len=args.seq_len,
                                      batch_size=args.batch_size)
    missing = sorted(q for q in first if q not in queries)
    if missing:
      raise ValueError(f"--run {args.run}: {len(missing)} queries have no text in --queries "
                       f"{args.queries}, e.g. {missing[:3]}")
    run = rr.rerank(scorer, queries, docs, first, depth=args.depth, progress=not args.no_progress)
    out = run if args.interpolate is None else rr.interpolate(run, first, args.interpolate)
    formats.write_trec_run(out, Path(args.out), tag=args.tag)
    print(f"wrote {args.out}: {sum(len(v) for v in out.values())} lines, {len(out)} queries")
    if qrels is not None:
      report = {"first_stage": rr.metrics(rr.top(first, args.depth), qrels, args.rel, list(run)),
                "reranker": rr.metrics(run, qrels, args.rel, list(run))}
      if args.interpolate is not None:
        report[f"interpolated_w{args.interpolate:g}"] = rr.metrics(out, qrels, args.rel, list(run))
      print(json.dumps(report, indent=1))
  except (FileNotFoundError, ValueError, KeyError) as err:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    sys.stderr.write(f"error: {msg}\n")
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
