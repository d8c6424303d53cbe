"""Input-pipeline throughput: packed LM batches per second from a token cache, on N CPU cores.

Measures `LMTask.train_batch(step, batch_size)` (shuffled windows read from the memory-mapped cache,
document separators inserted, segment ids / positions / loss masks computed) for consecutive steps,
as the training loop calls it. The process is pinned to `--cores` cores (default 2, the CI machine).

  python -m benchmarks.input_pipeline                       # gutenberg, bytes, 2048 x 64
  python -m benchmarks.input_pipeline --tokenizer bpe:8192 --seq_len 1024 --train_tokens 16000000
  python -m benchmarks.input_pipeline --synthetic           # no dataset needed: a random cache

Prints one line per configuration and, with --json, writes the numbers there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


from ssm_lab.data import lm, token_cache  # noqa: E402
from ssm_lab.data.tokenizer import ByteTokenizer  # noqa: E402


def _synthetic_task(seq_len: int, tokens: int, folder: Path) -> lm.LMTask:
  """A byte-level cache of random documents (lengths 1k..200k tokens), no dataset needed."""
  rng = np.random.default_rng(0)
  tok = ByteTokenizer()
  docs, total = [], 0
  while total < tokens:
    n = int(rng.integers(1_000, 200_000))
    docs.append(bytes(rng.integers(32, 127, size=n, dtype=np.uint8)).decode())
    total += n
  train = token_cache.build(docs, folder / "train", tok, max_tokens=tokens, progress=False)
  ev = token_cache.build(docs[:4], folder / "valid", tok, max_tokens=1 << 16, progress=False)
  return lm.LMTask(train, ev, tok, seq_len=seq_len, eval_sequences=8)


def measure(task: lm.LMTask, batch_size: int, steps: int) -> dict[str, float]:
  """Per-batch wall times of `steps` consecutive steps after a warm-up step. The median batch is
  the number to quote on a shared machine (other processes steal whole time slices); the mean
  is the sustained rate under whatever load there was."""
  task.train_batch(0, batch_size)  # first touch: permutation, page faults
  times = []
  for s in range(1, steps + 1):
    t0 = time.perf_counter()
    task.train_batch(s, batch_size)
    times.append(time.perf_counter() - t0)
  tokens = batch_size * task.seq_len
  med = statistics.median(times)
  return {"tokens_per_s": tokens / med, "ms_per_batch": 1e3 * med,
          "mean_tokens_per_s": tokens * len(times) / sum(times),
          "p90_ms_per_batch": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="gutenberg")
  p.add_argument("--tokenizer", default="bytes")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--train_tokens", type=int, default=32_000_000)
  p.add_argument("--cache_dir", default="")
  p.add_argument("--data_dir", default="")
  p.add_argument("--cores", type=int, default=2)
  p.add_argument("--synthetic", action="store_true")
  p.add_argument("--json", default="")
  args = p.parse_args()
  if hasattr(os, "sched_setaffinity"):
    avail = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(avail[:args.cores]))
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  with tempfile.TemporaryDirectory() as tmp:
    if args.synthetic:
      task = _synthetic_task(args.seq_len, args.train_tokens, Path(tmp))
      source = f"synthetic bytes, {args.train_tokens:,d} tokens"
    else:
      task = lm.build_lm_task(args.dataset, tokenizer=args.tokenizer, seq_len=args.seq_len,
                              train_tokens=args.train_tokens, eval_tokens=1 << 20,
                              eval_sequences=8, data_dir=args.data_dir, cache_dir=args.cache_dir)
      source = f"{args.dataset} ({task.tokenizer.name}), {task.train_stream.cache.num_tokens:,d} " \
               f"cached tokens ({task.train_stream.cache.meta['dtype']})"
    r = measure(task, args.batch_size, args.steps)
  result = dict(source=source, seq_len=args.seq_len, batch_size=args.batch_size, cores=cores,
                cpu=platform.processor() or platform.machine(), load_average=os.getloadavg()[0],
                **r)
  print(f"{source}: batch {args.batch_size} x {args.seq_len} on {cores} cores: "
        f"{r['tokens_per_s'] / 1e6:.1f}M tokens/s at the median batch ({r['ms_per_batch']:.2f} ms; "
        f"p90 {r['p90_ms_per_batch']:.2f} ms), {r['mean_tokens_per_s'] / 1e6:.1f}M tokens/s over "
        f"{args.steps} steps; load average {os.getloadavg()[0]:.1f}")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
