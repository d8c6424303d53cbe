"""The training loop: learning, exact resume, TensorBoard scalars, config validation, fault paths."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab import train
from ssm_lab.metrics import read_scalars
from lm_helpers import latest_state, tiny_lm_config


def tiny_config(pattern="MA", steps=12, **train_kw):
  return tiny_lm_config(pattern, steps, **{"log_every": 2, "eval_every": 6, "checkpoint_every": 3,
                                           **train_kw})


def load_params(workdir):
  step, state = latest_state(workdir)
  return step, state["params"]


def test_quickstart_loss_falls_within_a_few_dozen_steps(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "quickstart", os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.num_steps = 60
  config.train.eval_every = 60
  config.train.progress_bar = False
  config.task.num_eval_examples = 64
  train.train_and_evaluate(config, str(tmp_path))
  loss = [v for _, v in read_scalars(str(tmp_path / "train"))["loss"]]
  assert loss[-1] < loss[0] - 0.5, loss


def test_tensorboard_has_the_promised_scalars(tmp_path):
  train.train_and_evaluate(tiny_config(steps=6), str(tmp_path))
  train_tags = set(read_scalars(str(tmp_path / "train")))
  assert {"loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_s",
          "step_time_s"} <= train_tags
  assert {"loss", "accuracy"} <= set(read_scalars(str(tmp_path / "eval")))


def test_exact_resume_equals_an_uninterrupted_run(tmp_path):
  config = tiny_config(steps=8, checkpoint_every=4)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_at=4)
  assert load_params(resumed)[0] == 4
  train.train_and_evaluate(config, resumed)
  (s1, p1), (s2, p2) = load_params(straight), load_params(resumed)
  assert s1 == s2 == 8
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
    np.testing.assert_array_equal(a, b)
  # The resumed run logged the second half's losses exactly as the straight run did.
  l1 = dict(read_scalars(os.path.join(straight, "train"))["loss"])
  l2 = dict(read_scalars(os.path.join(resumed, "train"))["loss"])
  for step in (6, 8):
    assert l1[step] == pytest.approx(l2[step], rel=1e-6)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  config = tiny_config(steps=6, checkpoint_every=3)
  train.train_and_evaluate(config, str(tmp_path), stop_at=6)
  # Truncate every file of the newest checkpoint's state.
  newest = tmp_path / "checkpoints" / "6"
  for root, _, files in os.walk(newest / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb"):
        pass
  ckpt = train.Checkpointer(str(tmp_path), keep=3, save_every=3)
  restored = ckpt.restore_latest(None)
  ckpt.close()
  assert restored is not None and restored[0] == 3
  # And training resumes from step 3 to the end.
  train.train_and_evaluate(config, str(tmp_path))
  assert load_params(str(tmp_path))[0] == 6


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
  config = tiny_config(steps=20, learning_rate=1e30, max_bad_steps=3, grad_clip_norm=1e30)
  config.train.warmup_steps = 0
  with pytest.raises(FloatingPointError, match="3 consecutive steps"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.train.__setattr__("batch_sise", 3), "batch_sise"),
    (lambda c: c.model.__setitem__("pattern", "MQ"), "pattern"),
    (lambda c: c.model.attention.__setitem__("num_kv_heads", 3), "num_kv_heads"),
    (lambda c: c.model.__setitem__("d_state", 8), "config.model.mamba.d_state"),
    (lambda c: c.train.__setitem__("batch_size", 0), "batch_size"),
    (lambda c: c.model.__setitem__("dtype", "float16"), "dtype"),
])
def test_config_errors_name_the_field(tmp_path, mutate, match):
  config = tiny_config()
  mutate(config)
  with pytest.raises(config_lib.ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_ill_typed_field_is_rejected():
  config = tiny_config()
  with pytest.raises((config_lib.ConfigError, TypeError)):
    config.train.batch_size = "eight"
    config_lib.validate(config)


def test_unknown_task_lists_the_available_ones(tmp_path):
  config = tiny_config()
  config.task = ml_collections.ConfigDict(dict(name="nope"))
  with pytest.raises(ValueError, match="mqar"):
    train.train_and_evaluate(config, str(tmp_path))


def _step_setup(config):
  """(task, model, tx, initial state) for step-level tests of `train.train_step`."""
  task = train.make_task(config.task)
  model = train.build_model(config.model, vocab_size=task.vocab_size)
  tx = train.make_optimizer(config.train, config.model.pattern)
  state = jax.jit(train._state_initializer(task, model, tx))(jax.random.PRNGKey(config.seed))
  return task, model, tx, state


def test_weight_decay_exemptions_apply_only_inside_the_mixer_that_names_them():
  w = jnp.zeros((2, 2))
  params = {"embed": {"embedding": w},
            "block_0": {"mixer": {"A_log": w, "B": w, "in_proj": {"kernel": w}}, "norm": {"scale": w[0]}},
            "block_1": {"mixer": {"A_log": w, "B": w}},
            "block_2": {"mixer": {"A_log": w, "B": w}}}
  mask = train.decay_mask(params, "MAD")  # Mamba-1, attention, S4D
  assert mask["embed"]["embedding"] and mask["block_0"]["mixer"]["in_proj"]["kernel"]
  assert not mask["block_0"]["norm"]["scale"]                       # 1-D: never decayed
  assert not mask["block_0"]["mixer"]["A_log"] and mask["block_0"]["mixer"]["B"]   # Mamba: A_log only
  assert mask["block_1"]["mixer"]["A_log"] and mask["block_1"]["mixer"]["B"]       # attention: none
  assert not mask["block_2"]["mixer"]["A_log"] and not mask["block_2"]["mixer"]["B"]  # S4D: both


def test_grad_accumulation_4x8_equals_1x32():
  config = tiny_config(pattern="A", batch_size=32)
  task, model, tx, state0 = _step_setup(config)
  mesh = train.parallel.make_mesh()
  repl, rows = train.parallel.replicated(mesh), train.parallel.batch_sharding(mesh)
  trajectories = {}
  for accum in (1, 4):
    step = jax.jit(functools.partial(train.train_step, model=model, kind=task.kind, tx=tx,
                                     accum=accum, mesh=mesh),
                   in_shardings=(repl, rows), out_shardings=(repl, repl))
    state, losses = jax.device_put(state0, repl), []
    for s in range(3):
      state, m = step(state, train.parallel.shard_batch(task.train_batch(s, 32), mesh))
      losses.append(float(m["loss_sum"] / m["count"]))
    trajectories[accum] = (losses, state.params)
  np.testing.assert_allclose(trajectories[4][0], trajectories[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(trajectories[4][1]),
                  jax.tree.leaves(trajectories[1][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The trajectory moved: the comparison is not between two untouched states.
  assert trajectories[1][0][0] != trajectories[1][0][2]


def test_bf16_compute_keeps_float32_master_weights_and_optimizer_state():
  config = tiny_config(pattern="MA")
  config.model.dtype, config.model.param_dtype = "bfloat16", "float32"
  task, model, tx, state = _step_setup(config)
  batch = train._to_device(task.train_batch(0, 8))
  # The model's matrix products run in bfloat16 ...
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, batch["inputs"]))(state.params)
  dots = re.findall(r"(\w+)\[[\d,]*\] = dot_general", str(jaxpr))
  assert dots and dots.count("bf16") >= len(dots) // 2, dots
  # ... while parameters and both Adam moments stay float32, before and after an update.
  step = jax.jit(functools.partial(train.train_step, model=model, kind=task.kind, tx=tx, accum=1))
  new_state = state
  for s in range(2):  # the warmup's first learning rate is 0: take two steps to move
    new_state, metrics = step(new_state, train._to_device(task.train_batch(s, 8)))
    assert bool(metrics["finite"])
  for s in (state, new_state):
    floats = [x for x in jax.tree.leaves((s.params, s.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                    jax.tree.leaves(new_state.params), strict=True)]
  assert any(moved)


def test_prefetched_batches_are_the_synchronous_ones_and_errors_surface():
  from ssm_lab.data.mqar import MQAR  # noqa: PLC0415

  task = MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4)
  pre = train._Prefetcher(task, batch_size=4, end=6)
  try:
    for step in [0, 1, 2, 5, 6, 7]:   # a resume can jump; steps at or past `end` still come
      got, want = pre.get(step), task.train_batch(step, 4)
      assert all(np.array_equal(got[k], want[k]) for k in want)
  finally:
    pre.close()

  class Broken:
    def train_batch(self, step, batch_size):
      raise ValueError(f"bad batch {step}")

  pre = train._Prefetcher(Broken(), batch_size=4, end=10)
  with pytest.raises(ValueError, match="bad batch 3"):
    pre.get(3)
  pre.close()
