"""Builds `.carry/ranking_data/` (git-ignored) for the ranking units on the GPU machine.

  PYTHONPATH=$PWD python experiments/ranking/prepare_carry.py [--out .carry/ranking_data]

data/: the four collections (large text files xz-compressed; the loaders read .xz), the GPT-NeoX
tokenizer and nothing of Gutenberg; cache/: the Gutenberg token cache (14M train tokens, 0.5M valid,
uint16) and the BM25 top-100 runs of SciFact, WikiQA and Vaswani (so the GPU machine needs neither
the books nor bm25s). Prints the folder's size; the units need it under ~40 MiB.
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import sys
from pathlib import Path

import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402

SHARED = Path(os.environ.get("SSM_LAB_DATA_DIR", "/work/shared/data"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=".carry/ranking_data")
  args = parser.parse_args()
  out = Path(args.out).resolve()
  data, cache = out / "data", out / "cache"
  data.mkdir(parents=True, exist_ok=True)
  for name in tqdm.tqdm(list(sweep.DATASETS.values()) + ["tokenizers/gpt-neox-20b"], desc="copy"):
    src = SHARED / name
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
      dst = data / name / f.relative_to(src)
      dst.parent.mkdir(parents=True, exist_ok=True)
      if f.stat().st_size > 1 << 20 and f.suffix in (".jsonl", ".trec") and "tokenizers" not in name:
        with open(f, "rb") as i, lzma.open(str(dst) + ".xz", "wb", preset=6) as o:
          shutil.copyfileobj(i, o)
      else:
        shutil.copy(f, dst)
  from ssm_lab.data.lm import build_lm_task  # noqa: PLC0415
  from ssm_lab.data.ranking import bm25, load_collection  # noqa: PLC0415
  b = sweep.FULL
  build_lm_task("gutenberg", tokenizer=str(data / "tokenizers" / "gpt-neox-20b"),
                data_dir=str(SHARED), cache_dir=str(cache), train_tokens=b.train_tokens,
                eval_tokens=b.eval_tokens)
  for role in ("scifact", "wikiqa", "vaswani"):
    c = load_collection(sweep.DATASETS[role], str(data))
    bm25.first_stage_run(c, 100, bm25.BM25Params(), str(cache))
    shutil.rmtree(next((cache / "bm25").glob(f"{c.name}-*")) / bm25.BM25Params().tag() / "index",
                  ignore_errors=True)  # the run file is what the units read
  size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
  print(f"{out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
  main()
