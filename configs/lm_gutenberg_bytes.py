"""Byte-level language modelling on Project Gutenberg books (long documents, PG-19-like).

The first run tokenises the capped train split and the valid split into a token cache (uint8, ~36 MB
with these caps; `.venv/bin/python -m ssm_lab.data prepare gutenberg --max_tokens 32000000 --eval_tokens
4000000` does the same ahead of time). Eval reports loss, perplexity and bits per byte, which compare
directly with configs/lm_gutenberg_bpe.py. For the GPU machine, prepare with
`--cache_dir .carry/cache`, set `config.task.cache_dir = ".carry/cache"` and carry `.carry/cache`.
`.venv/bin/python -m ssm_lab.train --config configs/lm_gutenberg_bytes.py --workdir runs/lm_gutenberg_bytes`.

Sized for a GPU (its train step asks XLA for ~26.6 GB: more than a 23 GB CPU machine, where the
memory check stops it before training). Time per step: CPU: not measured; GPU: not measured.
"""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="lm", dataset="gutenberg", tokenizer="bytes", seq_len=2048, seed=0,
      train_tokens=32_000_000, eval_tokens=4_000_000, eval_sequences=256,
      data_dir="", cache_dir=""))
  m = config.model
  m.pattern = "MMMM"
  m.d_model = 256
  m.block_mlp = False
  m.dtype = "bfloat16"
  t = config.train
  t.batch_size = 32
  t.num_steps = 5000
  t.learning_rate = 2e-3
  t.warmup_steps = 200
  t.eval_every = 500
  t.checkpoint_every = 500
  return config
