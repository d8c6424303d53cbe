"""The one training loop for every model family: `python -m ssm_lab.train --config configs/x.py
--workdir DIR [--config.a.b=value ...]`.

`train_and_evaluate(config, workdir)` is the testable entry point. The step functions are pure (state,
batch) -> (state, metrics) and jitted; I/O (TensorBoard, checkpoints, the progress bar) happens at
the edges of the loop. Re-running with the same workdir resumes from its latest checkpoint, and since
the batch of step s is a pure function of (seed, s), the resumed run sees exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any

from absl import app, flags, logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from ssm_lab import config as config_lib
from ssm_lab.checkpoint import Checkpointer
from ssm_lab.data import base as data_base
from ssm_lab.data import make_task
from ssm_lab.metrics import SummaryWriter
from ssm_lab.models import LanguageModel, build_model, flops_per_token, param_count

# Dense bf16 peak FLOP/s by device kind (vendor datasheets), for MFU; config.train.peak_flops wins.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12}

# Parameters the Mamba recipe keeps out of weight decay (besides every 1-D parameter).
_NO_DECAY = ("A_log", "D", "dt_bias")


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array          # total updates skipped for non-finite loss or gradients
  consecutive_bad: jax.Array  # non-finite steps in a row (reset by a good step)


def make_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
  warmup = min(t.warmup_steps, max(t.num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
      decay_steps=max(t.num_steps, warmup + 1), end_value=t.learning_rate * t.min_lr_ratio)


def decay_mask(params: Any) -> Any:
  def keep(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim >= 2 and name not in _NO_DECAY
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip_norm),
      optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=decay_mask))


def _model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in ("segment_ids", "positions", "pad_mask") if k in batch}


def loss_and_metrics(params: Any, batch: dict[str, jax.Array], model: LanguageModel,
                     kind: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean loss over counted positions, and the sums {loss_sum, correct, count} for logging."""
  logits = model.apply({"params": params}, batch["inputs"], **_model_inputs(batch))
  if kind == "classification":
    labels = batch["labels"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = jnp.ones_like(losses)
  else:
    labels = batch["targets"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = batch["loss_mask"].astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * weights
  count = jnp.sum(weights)
  loss_sum = jnp.sum(losses * weights)
  return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": jnp.sum(correct),
                                              "count": count}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: LanguageModel, kind: str,
               tx: optax.GradientTransformation, accum: int) -> tuple[TrainState, dict]:
  """One optimizer update (over `accum` micro-batches); non-finite updates are skipped."""
  grad_fn = jax.value_and_grad(functools.partial(loss_and_metrics, model=model, kind=kind),
                               has_aux=True)
  if accum == 1:
    (_, sums), grads = grad_fn(state.params, batch)
  else:
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, mb):
      (_, s), g = grad_fn(state.params, mb)
      # Weight each micro-batch's mean gradient by its share of the counted positions.
      return jax.tree.map(jnp.add, carry, ({k: v for k, v in s.items()},
                                           jax.tree.map(lambda x: x * s["count"], g))), None
    zeros = ({"loss_sum": 0.0, "correct": 0.0, "count": 0.0},
             jax.tree.map(jnp.zeros_like, state.params))
    (sums, grads), _ = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["count"], 1.0), grads)
  loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  bad = (~finite).astype(jnp.int32)
  new_state = TrainState(step=state.step + 1, params=pick(new_params, state.params),
                         opt_state=pick(new_opt, state.opt_state), skipped=state.skipped + bad,
                         consecutive_bad=(state.consecutive_bad + 1) * bad)
  return new_state, {**sums, "grad_norm": grad_norm, "finite": finite,
                     "consecutive_bad": new_state.consecutive_bad}


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: LanguageModel, kind: str):
  return loss_and_metrics(params, batch, model, kind)[1]


def _to_device(batch: data_base.Batch) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _peak_flops(t: ml_collections.ConfigDict) -> float | None:
  if t.peak_flops > 0:
    return t.peak_flops
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name in kind:
      return peak
  return None


def _peak_memory_bytes() -> float | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else float(stats.get("peak_bytes_in_use", 0))


def evaluate(params: Any, task: Any, eval_fn: Any, batch_size: int) -> dict[str, float]:
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in task.eval_batches(batch_size):
    sums = eval_fn(params, _to_device(batch))
    for k in totals:
      totals[k] += float(sums[k])
  count = max(totals["count"], 1.0)
  out = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}
  hooks = data_base.optional_hooks(task)
  if "eval_summary" in hooks:
    out.update(hooks["eval_summary"](totals))
  return out


class _Preempted:
  """Turns SIGTERM into a flag the loop checks, so a preempted run checkpoints and exits cleanly."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook kernel thread): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at: int | None = None) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last eval metrics.

  `stop_at` ends this invocation after that step with a checkpoint, as a preemption would (the
  schedule still follows `config.train.num_steps`); rerunning resumes from there.
  """
  config_lib.validate(config)
  t = config.train
  task = make_task(config.task)
  model = build_model(config.model, vocab_size=task.vocab_size,
                      num_classes=getattr(task, "num_classes", 0) or None)
  kind = task.kind
  if (kind == "classification") != (model.args.head == "classifier"):
    raise config_lib.ConfigError(f"config.model.head={model.args.head!r} does not fit task "
                                 f"{task.name!r} of kind {kind!r} (use 'classifier' for "
                                 f"classification tasks, 'lm' otherwise)")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  tx = make_optimizer(t)
  sample = task.train_batch(0, 1)
  rng = jax.random.PRNGKey(config.seed)

  def init_state(key):
    params = model.init(key, jnp.asarray(sample["inputs"]),
                        **_model_inputs(_to_device(sample)))["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero,
                      consecutive_bad=zero)

  abstract = jax.eval_shape(init_state, rng)
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, save_every=t.checkpoint_every)
  restored = ckpt.restore_latest(abstract)
  if restored is None:
    state = jax.jit(init_state)(rng)
    start = 0
  else:
    start, state, meta = restored
    if meta.get("data_position", start) != start:
      raise RuntimeError(f"checkpoint {start} in {ckpt.directory} records data position "
                         f"{meta.get('data_position')}, not its step")
    print(f"resumed from step {start} in {ckpt.directory}")

  n_params = param_count(state.params)
  seq_len = task.seq_len
  fpt = flops_per_token(model.args, seq_len)
  peak = _peak_flops(t)
  print(f"model {model.args.pattern!r}: {n_params:,} parameters, {fpt:.3g} training FLOPs/token; "
        f"task {task.name!r} ({kind}), vocab {task.vocab_size}, length {seq_len}")
  train_writer = SummaryWriter(os.path.join(workdir, "train"))
  eval_writer = SummaryWriter(os.path.join(workdir, "eval"))
  if start == 0:
    hp = {f"model.{k}": v for k, v in config.model.items()}
    hp.update({f"train.{k}": v for k, v in t.items()})
    hp.update({"task.name": config.task.name, "params": n_params})
    train_writer.hparams(hp, ["eval/loss", "eval/accuracy", "train/loss"])
    train_writer.text(0, "config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")

  step_fn = jax.jit(functools.partial(train_step, model=model, kind=kind, tx=tx,
                                      accum=t.grad_accum_steps), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model, kind=kind))
  schedule = make_schedule(t)
  eval_bs = t.eval_batch_size or t.batch_size
  profile = tuple(int(s) for s in t.profile_steps.split(":")) if t.profile_steps else None
  hooks = data_base.optional_hooks(task)

  def save(step: int, force: bool = False) -> None:
    if force or step % t.checkpoint_every == 0:
      ckpt.save(step, state, {"data_position": step, "config": config.to_json_best_effort()},
                force=True)

  last_eval: dict[str, float] = {}
  pending: list[dict] = []
  window_start, window_steps = time.perf_counter(), 0
  bar = tqdm.tqdm(total=t.num_steps, initial=start, disable=not t.progress_bar, unit="step",
                  dynamic_ncols=True)
  lagged = None
  with _Preempted() as preempted:
    step = start
    while step < t.num_steps:
      if profile and step == profile[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      batch = _to_device(task.train_batch(step, t.batch_size))
      state, metrics = step_fn(state, batch)
      step += 1
      window_steps += 1
      pending.append(metrics)
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
      # Read the previous step's counter (one step behind) so the host never stalls the device.
      if lagged is not None and int(lagged) >= t.max_bad_steps:
        save(step, force=True)
        ckpt.close()
        raise FloatingPointError(
            f"{t.max_bad_steps} consecutive steps had a non-finite loss or gradient (by step "
            f"{step}); stopping. Lower config.train.learning_rate or check the data.")
      lagged = metrics["consecutive_bad"]
      if step % t.log_every == 0 or step == t.num_steps:
        fetched = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        count = max(sum(m["count"] for m in fetched), 1.0)
        tokens = window_steps * t.batch_size * seq_len
        scalars = {
            "loss": sum(m["loss_sum"] for m in fetched) / count,
            "accuracy": sum(m["correct"] for m in fetched) / count,
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "learning_rate": float(schedule(step - 1)),
            "step_time_s": elapsed / window_steps,
            "tokens_per_s": tokens / elapsed,
            "skipped_steps": float(state.skipped),
        }
        if peak:
          scalars["mfu"] = fpt * scalars["tokens_per_s"] / peak
        mem = _peak_memory_bytes()
        if mem:
          scalars["peak_memory_gib"] = mem / 2**30
        train_writer.scalars(step, scalars)
        bar.set_postfix(loss=f"{scalars['loss']:.3f}", acc=f"{scalars['accuracy']:.3f}")
        pending.clear()
        window_start, window_steps = time.perf_counter(), 0
      if step % t.eval_every == 0 or step == t.num_steps:
        last_eval = evaluate(state.params, task, eval_fn, eval_bs)
        if "evaluate" in hooks:
          score = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"],
                                                   **_model_inputs(b)))
          last_eval.update(hooks["evaluate"](
              lambda b: np.asarray(score(state.params, _to_device(b)))))
        eval_writer.scalars(step, last_eval)
        eval_writer.flush()
        bar.write(f"step {step}: " + ", ".join(f"eval {k} {v:.4g}" for k, v in last_eval.items()))
        window_start = time.perf_counter()  # keep evaluation out of the throughput numbers
      save(step, force=step == t.num_steps or step == stop_at)
      bar.update(1)
      if step == stop_at:
        break
      if preempted.flag:
        save(step, force=True)
        bar.write(f"SIGTERM: checkpointed step {step} in {ckpt.directory}; rerun to resume")
        break
  bar.close()
  train_writer.close()
  eval_writer.close()
  ckpt.close()
  return last_eval


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, config.")


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required")
  try:
    metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except config_lib.ConfigError as err:
    raise app.UsageError(str(err)) from err
  print(json.dumps({k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v)
                    for k, v in metrics.items()}))


if __name__ == "__main__":
  app.run(main)
