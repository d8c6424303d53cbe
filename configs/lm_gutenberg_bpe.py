"""BPE language modelling on Project Gutenberg books, comparable to lm_gutenberg_bytes.py by bits/byte.

`tokenizer="bpe:8192"` trains a byte-level BPE (tokenizers library) on the first 32 MB of the train
split on first use and saves it as `<cache>/tokenizers/gutenberg-bpe8192.json`; later runs reload it
by that name (and a copy goes into the token cache folder). The caps keep the uint16 cache at ~34 MB
(about 57 MB of text at ~3.6 bytes per token). Prepare ahead of time with
`python -m ssm_lab.data prepare gutenberg --tokenizer bpe:8192 --max_tokens 16000000
--eval_tokens 1000000`.
"""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="lm", dataset="gutenberg", tokenizer="bpe:8192", seq_len=1024, seed=0,
      train_tokens=16_000_000, eval_tokens=1_000_000, eval_sequences=256,
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
