"""A5 word problem (Merrill, Petty & Sabharwal 2024): running products of even permutations of 5 items,
60 tokens; the smallest non-solvable group. Same model and schedule as configs/s5.py."""

import ml_collections

from ssm_lab.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="word_problem", group="A5", seq_len=64, seed=0, num_eval_examples=1024,
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
