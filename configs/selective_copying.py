"""Selective copying as in Mamba (Gu & Dao 2023, appendix E.1): 16 data tokens scattered in 4096
positions, vocabulary of 16 (noise and marker included), 2-layer model with d_model 64.

The paper trains 400K steps at learning rate 1e-4, batch 64; this config runs a shorter schedule at a
higher rate. Lower `seq_len` (e.g. 256) for a CPU smoke test.

Sized for a GPU (length 4096; lower seq_len for CPU). Time per step: CPU: not measured; GPU: not
measured.
"""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="selective_copying", vocab_size=16, seq_len=4096, num_tokens=16, seed=0,
      num_eval_examples=512))
  m = config.model
  m.pattern = "MM"
  m.d_model = 64
  t = config.train
  t.batch_size = 64
  t.num_steps = 20000
  t.learning_rate = 1e-3
  t.warmup_steps = 500
  t.eval_every = 1000
  t.checkpoint_every = 1000
  return config
