"""S5 word problem (Merrill, Petty & Sabharwal 2024): predict the running product of random
permutations of 5 items at every position; 120 tokens. Non-solvable: the hard case for constant-depth
models. Compare with configs/a5.py and with a solvable control (`group="Z60"` or `"A4xZ5"`).

Sized for a CPU. Time per step: CPU (2 shared cores, 2026-12-07): ~6.9 s/step (2.9 GiB step); GPU:
not measured.
"""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="word_problem", group="S5", seq_len=64, seed=0, num_eval_examples=1024,
      eval_seq_len=0))
  m = config.model
  m.pattern = "MMMM"
  m.d_model = 128
  t = config.train
  t.batch_size = 64
  t.num_steps = 10000
  t.learning_rate = 1e-3
  t.warmup_steps = 500
  t.eval_every = 500
  t.checkpoint_every = 1000
  return config
