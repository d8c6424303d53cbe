"""Induction heads as in Mamba (Gu & Dao 2023, section 4.1.2, appendix E.1): train at length 256 with
a vocabulary of 16, 2-layer model with d_model 64, batch 8, fresh random data every step.

`eval_seq_len` evaluates at another length (the paper tests 2^6 .. 2^20); set it, e.g. 4096, to probe
extrapolation.

Sized for a CPU. Time per step: CPU: not measured; GPU: not measured.
"""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="induction_heads", vocab_size=16, seq_len=256, answer_len=1, seed=0,
      num_eval_examples=512, eval_seq_len=0))
  m = config.model
  m.pattern = "MM"
  m.d_model = 64
  t = config.train
  t.batch_size = 8
  t.num_steps = 20000
  t.learning_rate = 1e-3
  t.warmup_steps = 500
  t.eval_every = 1000
  t.checkpoint_every = 1000
  return config
