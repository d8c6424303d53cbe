"""Model units of the scaling study: training tokens/s and peak memory against sequence length at a
fixed number of tokens per step, for ~130M and ~350M Transformer++, Mamba, Mamba-2 and a hybrid.

Each (model, length) case runs `benchmarks/train_throughput.py`'s `run_case` (the training loop's own
jitted step: AdamW, clipping, bf16 compute, float32 master weights) in a child process, so its peak
memory is its own and an out-of-memory case costs only itself. A case that fails without
rematerialisation is retried once with `remat="block"` (recorded per point).

  python experiments/scaling/models.py --child '<json spec>' --seq_len 8192   # one case, prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ssm_lab.experiments import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")  # run_point, emit
TOKENS_PER_STEP = 65_536
LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536)
SMOKE_LENGTHS = (32, 64)
_HEADS = lambda n: dict(attention=dict(num_heads=n, num_kv_heads=n))
_M2 = dict(mamba2=dict(d_state=128, head_dim=64))
# Layer counts as benchmarks/train_throughput.py (Transformer blocks carry an MLP; SSMs use twice the
# blocks without one); the hybrid is Mamba-2 with one attention block in eight, as
# benchmarks/generation.py's hybrid rows (Jamba's 1:7 ratio, with Mamba-2 layers as Nemotron-H).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "130m": {
        "transformer": dict(pattern="A" * 12, d_model=768, block_mlp=True, **_HEADS(12)),
        "mamba": dict(pattern="M" * 24, d_model=768),
        "mamba2": dict(pattern="S" * 24, d_model=768, **_M2),
        "hybrid": dict(pattern="SSSSSSSA" * 3, d_model=768, **_M2, **_HEADS(12)),
    },
    "350m": {
        "transformer": dict(pattern="A" * 24, d_model=1024, block_mlp=True, **_HEADS(16)),
        "mamba": dict(pattern="M" * 48, d_model=1024),
        "mamba2": dict(pattern="S" * 48, d_model=1024, **_M2),
        "hybrid": dict(pattern="SSSSSSSA" * 6, d_model=1024, **_M2, **_HEADS(16)),
    },
}
SMOKE = {
    "transformer": dict(pattern="AA", d_model=32, block_mlp=True, vocab_size=128, **_HEADS(2)),
    "mamba": dict(pattern="MM", d_model=32, vocab_size=128),
    "mamba2": dict(pattern="SS", d_model=32, vocab_size=128, mamba2=dict(d_state=8, head_dim=16)),
    "hybrid": dict(pattern="SA", d_model=32, vocab_size=128, mamba2=dict(d_state=8, head_dim=16),
                   **_HEADS(2)),
}


def train_throughput_module() -> Any:
  return load_file(os.path.join(ROOT, "benchmarks", "train_throughput.py"))


def _child(spec: dict[str, Any], seq_len: int, steps: int, rounds: int, timeout_s: float
           ) -> dict[str, Any]:
  args = ["--child", json.dumps(spec), "--seq_len", str(seq_len), "--steps", str(steps),
          "--rounds", str(rounds)]
  return load_file(CHILD).run_point(__file__, args, timeout_s)


def sweep(size: str, model: str, smoke: bool = False, budget_s: float = 450.0,
          case_timeout_s: float = 240.0) -> dict[str, Any]:
  """Every length of one (size, model) at TOKENS_PER_STEP tokens per step (batch 1 past that)."""
  lengths = SMOKE_LENGTHS if smoke else LENGTHS
  tokens = 128 if smoke else TOKENS_PER_STEP
  base = dict(SMOKE[model] if smoke else SIZES[size][model])
  if smoke:
    base.update(dtype="float32")
  steps, rounds = (2, 1) if smoke else (4, 3)
  t0, points = time.perf_counter(), []
  for seq_len in lengths:
    if time.perf_counter() - t0 > budget_s:
      points.append({"seq_len": seq_len, "error": "skipped: unit budget spent"})
      continue
    spec = dict(base, batch=max(1, tokens // seq_len))
    point = _child(spec, seq_len, steps, rounds, case_timeout_s)
    if "error" in point and not point.get("timed_out"):
      first_error = point["error"]
      point = _child(dict(spec, remat="block"), seq_len, steps, rounds, case_timeout_s)
      point["remat"], point["error_without_remat"] = "block", first_error
    else:
      point["remat"] = "none"
    point["seq_len"] = seq_len
    print(f"  {size}/{model} L={seq_len}: {point.get('tokens_per_s', point.get('error'))}",
          flush=True)
    points.append(point)
  return {"size": size, "model": model, "pattern": base["pattern"], "d_model": base["d_model"],
          "tokens_per_step": tokens, "points": points}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--child", required=True, help="JSON model spec with its batch")
  p.add_argument("--seq_len", type=int, required=True)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  record = train_throughput_module().run_case("scaling", json.loads(a.child), a.seq_len, a.steps,
                                              a.rounds)
  load_file(CHILD).emit(record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
