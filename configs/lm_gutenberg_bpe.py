"""BPE language modelling on Project Gutenberg books, comparable to lm_gutenberg_bytes.py by bits/byte.

`tokenizer="bpe:8192"` trains a byte-level BPE (tokenizers library) on the first 32 MB of the train
split on first use and saves it as `<cache>/tokenizers/gutenberg-bpe8192.json`; later runs reload it
by that name (and a copy goes into the token cache folder). The caps keep the uint16 cache at ~34 MB
(about 57 MB of text at ~3.6 bytes per token). Prepare ahead of time with
`.venv/bin/python -m ssm_lab.data prepare gutenberg --tokenizer bpe:8192 --max_tokens 16000000
--eval_tokens 1000000`.

Sized for a GPU. Time per step: CPU: not measured; GPU: not measured.
"""

import os

import ml_collections

from ssm_lab.config import load_config


def get_config() -> ml_collections.ConfigDict:
  """lm_gutenberg_bytes.py's model and schedule; a BPE tokenizer and its own token caps."""
  config = load_config(os.path.join(os.path.dirname(__file__), "lm_gutenberg_bytes.py"))
  config.task.tokenizer = "bpe:8192"
  config.task.seq_len = 1024
  config.task.train_tokens = 16_000_000
  config.task.eval_tokens = 1_000_000
  return config
