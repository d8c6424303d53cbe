"""Shared by the training-loop and study-runner tests: tiny MQAR language-model configs (one set
field by field, one built as a study sweep builds its runs) and the latest checkpoint's state of a
workdir. (tests/conftest.py puts this folder on sys.path; the toy studies' sweep files import it.)"""

import os

import ml_collections
import orbax.checkpoint as ocp

from ssm_lab import config as config_lib
from ssm_lab.experiments import sweep_config


def tiny_lm_config(pattern="MA", steps=12, seed=0, **train_kw):
  """A 2-layer d_model-32 model on MQAR (vocab 32, length 24), batch 8, 2 warmup steps; `train_kw`
  sets config.train fields (log_every, eval_every, learning_rate, ...)."""
  config = config_lib.base_config()
  config.seed = seed
  config.task = ml_collections.ConfigDict(dict(name="mqar", vocab_size=32, seq_len=24,
                                               num_kv_pairs=3, num_eval_examples=32))
  config.model.pattern = pattern
  config.model.d_model = 32
  config.model.attention.num_heads = 2
  config.model.attention.num_kv_heads = 2
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps, t.progress_bar = 8, steps, 2, False
  for k, v in train_kw.items():
    t[k] = v
  return config


def latest_state(workdir):
  """(step, train state) of the newest checkpoint in `workdir`."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return step, state


def tiny_study_config(lr, seed=0, steps=4, eval_every=4):
  """A 1-layer d_model-16 attention model on MQAR (vocab 32, length 16) through `sweep_config`,
  evaluated every `eval_every` steps (the runner's early-stop segments)."""
  config = sweep_config(dict(name="mqar", vocab_size=32, seq_len=16, num_kv_pairs=2,
                             num_eval_examples=16),
                        pattern="A", d_model=16,
                        mixers={"attention": dict(num_heads=1, num_kv_heads=1)},
                        batch_size=8, num_steps=steps, learning_rate=lr, warmup_steps=1,
                        segments=steps // eval_every)
  config.seed = seed
  config.train.log_every = 2
  return config
