"""Quality-per-compute units of the scaling study (Mamba paper Figure 4, at small scale): Transformer++
(LLaMA-style: RoPE, SwiGLU, RMSNorm), Mamba, Mamba-2 and a Mamba-2 hybrid (one attention block in
eight) trained on Project Gutenberg with the same tokens per size, a few learning rates each; eval
loss and bits per byte against training FLOPs.

GPU sizes use the GPT-NeoX tokenizer from a token cache prepared on this machine (the device cannot
see the corpus; see the README's "Token cache"); the CPU size is byte-level, for minutes of CPU.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ssm_lab.config import base_config
from ssm_lab.experiments import set_mixer

CACHE_DIR = ".carry/gutenberg_neox"
# size -> (d_model, Transformer blocks, tokens, batch, seq_len, learning rates). SSM models have
# twice the blocks (no MLP): about 12 d^2 non-embedding parameters per Transformer block, 6 d^2
# per Mamba or Mamba-2 block.
SIZES: dict[str, tuple[int, int, int, int, int, tuple[float, ...]]] = {
    "5m": (256, 6, 25_000_000, 64, 1024, (1e-3, 2e-3, 4e-3)),
    "15m": (384, 8, 50_000_000, 64, 1024, (6e-4, 1.2e-3, 2.4e-3)),
    "40m": (512, 12, 100_000_000, 64, 1024, (4e-4, 8e-4, 1.6e-3)),
    # CPU scale: byte-level, ~0.2M and ~0.8M non-embedding parameters (a larger CPU size costs an
    # hour a Mamba run on 2 cores: the cpu1m Mamba step takes ~4 s there).
    # Three learning rates: with two (2e-3, 6e-3) every cpu1m model was best at the higher one.
    "cpu0p2m": (64, 4, 307_200, 8, 256, (3e-3, 9e-3, 2.7e-2)),
    "cpu1m": (128, 4, 614_400, 16, 256, (2e-3, 6e-3, 1.8e-2)),
}
SMOKE = (32, 1, 2048, 4, 32, (3e-3,))
ARCHS = ("transformer", "mamba", "mamba2", "hybrid")


def pattern(arch: str, blocks: int) -> str:
  ssm = 2 * blocks
  return {"transformer": "A" * blocks, "mamba": "M" * ssm, "mamba2": "S" * ssm,
          "hybrid": ("SSSSSSSA" * (ssm // 8 + 1))[:ssm - 1] + "A"}[arch]


def make_config(arch: str, size: str, lr: float, smoke: bool = False) -> ml_collections.ConfigDict:
  d, blocks, tokens, batch, seq_len, _ = SMOKE if smoke else SIZES[size]
  cpu = smoke or size.startswith("cpu")
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="lm", dataset="gutenberg", tokenizer="bytes" if cpu else "gpt-neox-20b",
      seq_len=seq_len, seed=0, train_tokens=max(tokens, 2_000_000) if cpu else tokens,
      eval_tokens=200_000 if cpu else 1_000_000, eval_sequences=16 if smoke else (64 if cpu else 256),
      data_dir="", cache_dir="" if cpu else CACHE_DIR))
  m = config.model
  m.pattern = pattern(arch, blocks)
  m.d_model = d
  m.block_mlp = arch == "transformer"
  m.dtype = "float32" if cpu else "bfloat16"
  heads = max(1, d // 64)
  set_mixer(config, "attention", num_heads=heads, num_kv_heads=heads)
  set_mixer(config, "mamba", d_state=16)
  set_mixer(config, "mamba2", d_state=64 if cpu else 128, head_dim=min(64, d // 2))
  t = config.train
  t.batch_size = batch
  t.num_steps = max(1, tokens // (batch * seq_len))
  t.learning_rate = lr
  t.warmup_steps = max(1, t.num_steps // 10)
  t.eval_every = t.num_steps
  t.checkpoint_every = t.num_steps if cpu else max(1, t.num_steps // 4)
  t.keep_checkpoints = 1
  t.log_every = max(1, t.num_steps // 10)
  t.progress_bar = False
  return config


def compute(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Parameters (all and non-embedding) and training FLOPs of a finished run, from its config."""
  del workdir
  from ssm_lab.models import abstract_params, build_model, flops_per_token, param_count  # noqa: PLC0415

  vocab = 256 if config.task.tokenizer == "bytes" else 50_277
  model = build_model(config.model, vocab_size=vocab)
  params = abstract_params(model, 8)
  total = param_count(params)
  embed = param_count({k: v for k, v in params.items() if "embed" in k.lower()})
  tokens = config.train.num_steps * config.train.batch_size * config.task.seq_len
  return {"params": total, "non_embedding_params": total - embed, "train_tokens": tokens,
          "train_flops": flops_per_token(model.args, config.task.seq_len) * tokens}
