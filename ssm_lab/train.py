"""The one training loop for every model family: `python -m ssm_lab.train --config configs/x.py
--workdir DIR [--config.a.b=value ...] [--profile_steps=10:20]`.

`train_and_evaluate(config, workdir)` is the testable entry point. The step functions are pure (state,
batch) -> (state, metrics) and jitted with explicit shardings over a mesh of every device
(`ssm_lab.parallel`: data parallel or FSDP, one or many processes). I/O (TensorBoard, checkpoints, the
progress bar) happens at the edges of the loop, on the first process only. Re-running with the same
workdir resumes from its latest checkpoint, and since the global batch of step s is a pure function of
(seed, s), the resumed run sees exactly the batches an uninterrupted run would have, whatever the
number of devices.

Multi-host: start one process per host with `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) and the same
--workdir on a shared filesystem.
"""

from __future__ import annotations

import concurrent.futures
import difflib
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
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from ssm_lab import cli
from ssm_lab import config as config_lib
from ssm_lab import parallel
from ssm_lab.checkpoint import Checkpointer, WorkdirBusy, WorkdirLock
from ssm_lab.data import base as data_base
from ssm_lab.data import make_task
from ssm_lab.layers import registry
from ssm_lab.metrics import SummaryWriter
from ssm_lab.models import LanguageModel, build_model, flops_per_token, param_count

# Dense bf16 peak FLOP/s per device by device kind (vendor datasheets), for MFU;
# config.train.peak_flops wins.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12}

# A state is checkpointed only while its parameters' global norm stays within this factor of the
# initial parameters' norm: healthy training moves it by a small factor, a run on its way to
# diverging (too high a learning rate) by orders of magnitude before its loss turns non-finite.
SANE_NORM_GROWTH = 100.0

# Overrides the memory the train step may use (GiB), for tests and for sharing a machine.
MEMORY_LIMIT_ENV = "SSM_LAB_MEMORY_LIMIT_GB"


class RunError(Exception):
  """A condition the user must act on (the command line prints the message as one line)."""


class CheckpointsUnreadable(RunError):
  """Every checkpoint of the workdir was set aside; starting over is the user's call."""


class OutOfMemory(RunError):
  """The compiled train step needs more memory than the device has."""


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array          # total updates skipped for non-finite loss or gradients
  consecutive_bad: jax.Array  # non-finite steps in a row (reset by a good step)


def make_schedule(t: ml_collections.ConfigDict, peak: float | None = None) -> optax.Schedule:
  """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio.

  `peak` replaces learning_rate (a population trains with peak 1.0 and scales each member's updates
  by its own learning rate: the schedule is linear in its peak).
  """
  peak = t.learning_rate if peak is None else peak
  warmup = min(t.warmup_steps, max(t.num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(t.num_steps, warmup + 1), end_value=peak * t.min_lr_ratio)


def decay_mask(params: Any, pattern: str) -> Any:
  """True where AdamW decays a parameter: every parameter of 2 or more dimensions except those a
  block's mixer names in its registry entry (`no_weight_decay`, e.g. Mamba's A_log), which are
  matched only inside that block's mixer (`block_<i>/<module_name>/.../<name>`, the mixer of
  `pattern[i]`), so one mixer's names never exempt another mixer's weights."""
  exempt = {}
  for i, letter in enumerate(pattern):
    spec = registry.get(letter)
    exempt[f"block_{i}"] = (spec.module_name, frozenset(spec.no_weight_decay))

  def keep(path, x):
    if x.ndim < 2:
      return False
    keys = [str(getattr(p, "key", p)) for p in path]
    for j, k in enumerate(keys[:-1]):
      if k in exempt:
        module, names = exempt[k]
        return not (keys[j + 1] == module and keys[-1] in names)
    return True
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(t: ml_collections.ConfigDict, pattern: str,
                   unit_lr: bool = False) -> optax.GradientTransformation:
  """AdamW after global-norm clipping; its moments take the parameters' dtype (float32 masters).
  `pattern` is the model's layer pattern (config.model.pattern): it says which mixer's
  `no_weight_decay` names apply to which block (`decay_mask`).

  `unit_lr`: the schedule peaks at 1.0 instead of t.learning_rate, for `train_step(lr_scale=...)`
  (AdamW's update is -lr(t) * (adam + wd * p), so scaling it by the peak gives the same update).
  """
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip_norm),
      optax.adamw(make_schedule(t, 1.0 if unit_lr else None), b1=t.b1, b2=t.b2,
                  weight_decay=t.weight_decay, mask=functools.partial(decay_mask, pattern=pattern)))


def _model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in ("segment_ids", "positions", "pad_mask") if k in batch}


def _group_ranking(scores: jax.Array, batch: dict[str, jax.Array], loss: str,
                   group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(losses, weights, correct) of one score per row [batch], the rows forming consecutive groups
  of `group_size` with the relevant document first (a grouped ranking task).

  "lce": localized contrastive estimation (Gao et al. 2021; RankMamba's loss), a softmax
  cross-entropy over each group's scores with the first row as the target; one term per group,
  correct when the relevant row scores highest. "bce": sigmoid cross-entropy of every row against
  its 0/1 label; correct when the score's sign matches the label.
  """
  if loss == "lce":
    groups = scores.reshape(-1, group_size)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        groups, jnp.zeros((groups.shape[0],), jnp.int32))
    correct = (jnp.argmax(groups, axis=-1) == 0).astype(jnp.float32)
    weights = (batch["example_mask"].astype(jnp.float32).reshape(-1, group_size)[:, 0]
               if "example_mask" in batch else jnp.ones_like(losses))
    return losses, weights, correct * weights
  labels = batch["labels"].astype(jnp.float32)
  losses = optax.sigmoid_binary_cross_entropy(scores, labels)
  weights = (batch["example_mask"].astype(jnp.float32) if "example_mask" in batch
             else jnp.ones_like(losses))
  correct = ((scores > 0).astype(jnp.float32) == labels).astype(jnp.float32)
  return losses, weights, correct * weights


def loss_and_metrics(params: Any, batch: dict[str, jax.Array], model: LanguageModel,
                     kind: str, group: tuple[str, int] | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean loss over counted positions, and the sums {loss_sum, correct, count} for logging.

  An optional `example_mask` float32 [batch] (0 on rows that only pad a batch to a multiple of the
  device count) removes whole rows from every sum. Kind "group_ranking" scores each row with the
  model's single output and trains `group` = (loss, group_size) (see `_group_ranking`).
  """
  logits = model.apply({"params": params}, batch["inputs"], **_model_inputs(batch))
  if kind == "group_ranking":
    if group is None:
      raise ValueError("loss_and_metrics: kind 'group_ranking' needs group=(loss, group_size)")
    losses, weights, correct = _group_ranking(logits[:, 0].astype(jnp.float32), batch, *group)
    count = jnp.sum(weights)
    loss_sum = jnp.sum(losses * weights)
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": jnp.sum(correct),
                                                "count": count}
  if kind == "classification":
    labels = batch["labels"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = jnp.ones_like(losses)
  else:
    labels = batch["targets"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = batch["loss_mask"].astype(jnp.float32)
  if "example_mask" in batch:
    row = batch["example_mask"].astype(jnp.float32)
    weights = weights * row.reshape(row.shape + (1,) * (weights.ndim - 1))
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * weights
  count = jnp.sum(weights)
  loss_sum = jnp.sum(losses * weights)
  return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": jnp.sum(correct),
                                              "count": count}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: LanguageModel, kind: str,
               tx: optax.GradientTransformation, accum: int, mesh: Mesh | None = None,
               param_shardings: Any = None, lr_scale: jax.Array | None = None,
               group: tuple[str, int] | None = None
               ) -> tuple[TrainState, dict]:
  """One optimizer update (over `accum` micro-batches); non-finite updates are skipped.

  `lr_scale` multiplies the optimizer's updates: the peak learning rate of a `tx` built with
  `make_optimizer(t, pattern, unit_lr=True)` (one per member of a vmapped population).

  batch: {name: [batch, ...]}. Micro-batch j holds rows j, j + accum, j + 2 accum, ... so that each
  one stays spread over every device of a batch-sharded mesh. With `param_shardings` (FSDP), the
  parameters are gathered whole for the forward and backward passes and the gradients are
  reduce-scattered back to the parameters' shardings.
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_and_metrics, model=model, kind=kind,
                                                 group=group), has_aux=True)
  params = state.params
  if param_shardings is not None and mesh is not None:
    params = jax.lax.with_sharding_constraint(params, NamedSharding(mesh, P()))
  if accum == 1:
    (_, sums), grads = grad_fn(params, batch)
  else:
    def split(x):
      x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, parallel.DATA_AXIS)))
      return x
    micro = jax.tree.map(split, batch)

    def body(carry, mb):
      (_, s), g = grad_fn(params, mb)
      if param_shardings is not None:  # FSDP: keep the running sum sharded like the parameters
        g = jax.lax.with_sharding_constraint(g, param_shardings)
      # Weight each micro-batch's mean gradient by its share of the counted positions (float32).
      return jax.tree.map(jnp.add, carry, ({k: v for k, v in s.items()},
                                           jax.tree.map(lambda x: x * s["count"], g))), None
    zeros = ({"loss_sum": 0.0, "correct": 0.0, "count": 0.0},
             jax.tree.map(jnp.zeros_like, state.params))
    (sums, grads), _ = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["count"], 1.0), grads)
  if param_shardings is not None:
    grads = jax.lax.with_sharding_constraint(grads, param_shardings)
  loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  if lr_scale is not None:
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
  new_params = optax.apply_updates(state.params, updates)
  pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  bad = (~finite).astype(jnp.int32)
  new_state = TrainState(step=state.step + 1, params=pick(new_params, state.params),
                         opt_state=pick(new_opt, state.opt_state), skipped=state.skipped + bad,
                         consecutive_bad=(state.consecutive_bad + 1) * bad)
  return new_state, {**sums, "grad_norm": grad_norm, "finite": finite,
                     "consecutive_bad": new_state.consecutive_bad}


def population_step(state: TrainState, batch: dict[str, jax.Array], lr: jax.Array,
                    active: jax.Array, **step_kw: Any) -> tuple[TrainState, dict]:
  """`train_step` vmapped over a population: state [members, ...], lr and active [members]; every
  member sees the same batch (its data follows config.task, which the members share). `step_kw`
  as for train_step, with `tx` from `make_optimizer(t, pattern, unit_lr=True)`."""
  def one(s, l, a):
    new, metrics = train_step(s, batch, lr_scale=l, **step_kw)
    # A frozen (diverged) member keeps its state: its updates are dropped.
    return jax.tree.map(lambda x, y: jnp.where(a, x, y), new, s), metrics
  return jax.vmap(one)(state, lr, active)


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: LanguageModel, kind: str,
              group: tuple[str, int] | None = None):
  return loss_and_metrics(params, batch, model, kind, group)[1]


def _to_device(batch: data_base.Batch) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _peak_flops(t: ml_collections.ConfigDict) -> float | None:
  """Peak FLOP/s of one device (the config's, else looked up from the device kind)."""
  if t.peak_flops > 0:
    return t.peak_flops
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name in kind:
      return peak
  return None


def _peak_memory_bytes() -> float | None:
  """The largest peak_bytes_in_use over this process's devices (None where not reported)."""
  peaks = []
  for device in jax.local_devices():
    stats = device.memory_stats()
    if stats:
      peaks.append(float(stats.get("peak_bytes_in_use", 0)))
  return max(peaks) if peaks else None


def _sharded(batch: data_base.Batch, mesh: Mesh) -> tuple[dict[str, jax.Array], int]:
  """A host batch padded to a multiple of the mesh size and sharded on its rows; (batch, real rows)."""
  padded, real = parallel.pad_rows(batch, mesh.size)
  return parallel.shard_batch(padded, mesh), real


def _eval_totals(params: Any, task: Any, eval_fn: Any, batch_size: int,
                 mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """{loss_sum, correct, count} over the eval set, float64 ([members] for a population's eval_fn)."""
  totals: dict[str, Any] = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in task.eval_batches(batch_size):
    device_batch = _to_device(batch) if mesh is None else _sharded(batch, mesh)[0]
    sums = jax.device_get(eval_fn(params, device_batch))
    for k in totals:
      totals[k] = totals[k] + np.asarray(sums[k], np.float64)
  return totals


def evaluate(params: Any, task: Any, eval_fn: Any, batch_size: int,
             mesh: Mesh | None = None) -> dict[str, float]:
  totals = _eval_totals(params, task, eval_fn, batch_size, mesh)
  return _eval_metrics({k: float(v) for k, v in totals.items()}, task)


def _eval_metrics(totals: dict[str, float], task: Any) -> dict[str, float]:
  count = max(totals["count"], 1.0)
  out = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}
  hooks = data_base.optional_hooks(task)
  if "eval_summary" in hooks:
    out.update(hooks["eval_summary"](totals))
  return out


class _Prefetcher:
  """Host batches built ahead of the step that needs them, on one worker thread.

  `task.train_batch(step, batch_size)` is a pure function of the step, so the next `depth` batches
  can be made while the device runs this one (MQAR, selective copying and the text loaders spend
  milliseconds per batch in NumPy, which would otherwise sit between device steps). Batches come
  out exactly as the synchronous loop made them.
  """

  def __init__(self, task: Any, batch_size: int, end: int, depth: int = 2):
    self._make = functools.partial(task.train_batch, batch_size=batch_size)
    self._end, self._depth = end, depth
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batches")
    self._ahead: dict[int, concurrent.futures.Future] = {}

  def get(self, step: int) -> data_base.Batch:
    for s in [step, *range(step + 1, min(step + 1 + self._depth, self._end))]:
      if s not in self._ahead:
        self._ahead[s] = self._pool.submit(self._make, s)
    for s in [s for s in self._ahead if s < step]:
      self._ahead.pop(s).cancel()
    return self._ahead.pop(step).result()

  def close(self) -> None:
    for f in self._ahead.values():
      f.cancel()
    self._pool.shutdown(wait=True, cancel_futures=True)


class _Preempted:
  """Turns SIGTERM into a flag the loop checks, so a preempted run checkpoints and exits cleanly.

  Single-process runs only: with several processes JAX's preemption service (started by
  jax.distributed.initialize) owns SIGTERM and `reached_preemption_sync_point` picks a step that
  every process checkpoints at.
  """

  def __init__(self, install: bool = True):
    self.flag = False
    self._old = None
    self._install = install

  def __enter__(self):
    if not self._install:
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook kernel thread): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _NullWriter:
  """Stands in for SummaryWriter on processes other than the first."""

  def scalars(self, *args: Any) -> None:
    del args

  text = hparams = scalars

  def flush(self) -> None:
    pass

  close = flush


def _state_initializer(task: Any, model: LanguageModel, tx: optax.GradientTransformation):
  """key -> a fresh TrainState (parameters from the model's initialisers, step 0)."""
  sample = task.train_batch(0, 1)

  def init_state(key: jax.Array) -> TrainState:
    params = model.init(key, jnp.asarray(sample["inputs"]),
                        **_model_inputs(_to_device(sample)))["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero,
                      consecutive_bad=zero)
  return init_state


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
  """The TrainState `config` trains, as ShapeDtypeStructs (nothing is allocated or compiled)."""
  task = make_task(config.task)
  model = build_model(config.model, vocab_size=task.vocab_size,
                      num_classes=getattr(task, "num_classes", 0) or None)
  init_state = _state_initializer(task, model, make_optimizer(config.train, config.model.pattern))
  return jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))


def _check_mesh_fits(t: ml_collections.ConfigDict, mesh: Mesh) -> None:
  per_step = mesh.size * t.grad_accum_steps
  if t.batch_size % per_step:
    raise config_lib.ConfigError(
        f"config.train.batch_size={t.batch_size} must be a multiple of the {mesh.size} devices "
        f"times config.train.grad_accum_steps={t.grad_accum_steps} (= {per_step}), so that every "
        f"micro-batch splits evenly over the devices")


def _memory_limit() -> tuple[float, str] | None:
  """(bytes one device may use, where that number comes from), or None when unknown."""
  env = os.environ.get(MEMORY_LIMIT_ENV, "")
  if env:
    return float(env) * 2**30, f"${MEMORY_LIMIT_ENV}"
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
      # Simulated CPU devices share the host's RAM.
      return (float(info["MemAvailable"].split()[0]) * 1024 / jax.local_device_count(),
              "available RAM")
    except (OSError, KeyError, ValueError):
      return None
  stats = device.memory_stats() or {}
  return (float(stats["bytes_limit"]), f"{device.device_kind} memory") if "bytes_limit" in stats \
      else None


def step_memory_bytes(compiled: Any) -> float | None:
  """Peak bytes one device needs for a compiled step (arguments, outputs, temporaries; donated
  buffers counted once), or None when XLA does not say."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if ma is None:
    return None
  return float(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes + ma.generated_code_size_in_bytes)


def check_step_memory(compiled: Any, config: ml_collections.ConfigDict) -> None:
  """Raises OutOfMemory, naming the fields to change, when the step cannot fit the device."""
  need, limit = step_memory_bytes(compiled), _memory_limit()
  if need is None or limit is None or need <= limit[0]:
    return
  t, m = config.train, config.model
  hints = [f"config.train.batch_size (now {t.batch_size})",
           f"raise config.train.grad_accum_steps (now {t.grad_accum_steps}; smaller micro-batches)"]
  if m.remat != "block":
    hints.append(f"config.model.remat='block' (now {m.remat!r})")
  if "seq_len" in config.task:
    hints.append(f"config.task.seq_len (now {config.task.seq_len})")
  hints.append(f"the model (config.model.d_model={m.d_model}, pattern {m.pattern!r})")
  raise OutOfMemory(
      f"the train step needs {need / 2**30:.2f} GiB per device but {limit[1]} is "
      f"{limit[0] / 2**30:.2f} GiB; lower " + ", ".join(hints))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def config_changes(saved_json: str | None, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{field: (value in the checkpoint's config, value now)} for the fields that differ."""
  if not saved_json:
    return {}
  try:
    old = _flat(json.loads(saved_json))
  except ValueError:
    return {}
  new = _flat(json.loads(config.to_json_best_effort()))
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}


@jax.jit
def _param_health(params: Any) -> tuple[jax.Array, jax.Array]:
  """(every parameter finite, global norm)."""
  leaves = jax.tree.leaves(params)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return finite, optax.global_norm(params)


def init_params_from(path: str, params: Any) -> tuple[Any, list[str]]:
  """`params` with every array that the model at `path` has at the same path and shape copied from
  it; returns (params, the paths that kept their fresh initialisation).

  `path` is an ssm_lab run directory (its latest checkpoint, through `ssm_lab.runs.load_run`) or a
  local Hugging Face model directory (`ssm_lab.models.from_pretrained`). A new head (a classifier on
  a pretrained language model, say) keeps its initialisation; an array that exists in both with
  another shape, or nothing in common at all, is an error naming the array.
  """
  path = os.path.expanduser(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    from ssm_lab.runs import load_run  # noqa: PLC0415 (runs imports this module's neighbours)
    source = load_run(path).params
  elif os.path.isfile(os.path.join(path, "config.json")):
    from ssm_lab.models import from_pretrained  # noqa: PLC0415
    source = from_pretrained(path)[1]
  else:
    raise FileNotFoundError(f"config.train.init_from={path!r} is neither an ssm_lab run directory "
                            f"(with checkpoints/) nor a Hugging Face model directory (config.json)")
  src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(source)}
  fresh, copied = [], 0

  def take(key, x):
    nonlocal copied
    name = jax.tree_util.keystr(key)
    if name not in src:
      fresh.append(name)
      return x
    if tuple(src[name].shape) != tuple(x.shape):
      raise ValueError(f"config.train.init_from={path!r}: parameter {name} has shape "
                       f"{tuple(src[name].shape)} there and {tuple(x.shape)} here (another width "
                       f"or vocabulary?)")
    copied += 1
    return jnp.asarray(src[name], x.dtype)
  params = jax.tree_util.tree_map_with_path(take, params)
  if not copied:
    raise ValueError(f"config.train.init_from={path!r}: no parameter path in common with this model")
  return params, fresh


def _last_logged(workdir: str) -> dict[str, float]:
  """The newest eval metrics in the workdir's TensorBoard events, else the newest train loss and
  accuracy (what a rerun of a finished or preempted run reports instead of nothing)."""
  from ssm_lab.metrics import read_scalars  # noqa: PLC0415
  for sub, keys, prefix in (("eval", None, ""), ("train", ("loss", "accuracy"), "train_")):
    path = os.path.join(workdir, sub)
    if not os.path.isdir(path):
      continue
    scalars = read_scalars(path)
    if keys:
      scalars = {k: v for k, v in scalars.items() if k in keys}
    if scalars:
      last = max(v[-1][0] for v in scalars.values())
      return {prefix + k: float(v[-1][1]) for k, v in scalars.items() if v[-1][0] == last}
  return {}


# Config fields in which the members of a population may differ (everything else is one program).
POPULATION_FIELDS = ("train.learning_rate", "seed")


def _align_population(members: list[Any], say: Any) -> None:
  """Brings the members of a population back to one step when a run stopped between their saves
  (a kill during a preemption checkpoint saves some members and not others): the newest step every
  member has a checkpoint at is where they resume together, as one program, and the newer
  checkpoints of the members ahead are moved aside (kept, under `checkpoints_ahead/`). Batches
  are a function of the step, so the steps retrained are the ones those members already took.
  Nothing changes when the members agree or share no step."""
  steps = [set(m.ckpt.steps()) for m in members]
  if len({max(s, default=0) for s in steps}) <= 1:
    return
  common = set.intersection(*steps)
  if not common:
    return
  at = max(common)
  for m, s in zip(members, steps, strict=True):
    ahead = sorted(x for x in s if x > at)
    if ahead:
      where = m.ckpt.set_aside_after(at)
      say(f"{m.workdir}: resuming the population together at step {at}; this member's newer "
          f"checkpoint(s) {ahead} moved to {where}")


class PopulationError(RunError):
  """A population that cannot train as one program (members at different steps, FSDP): train its
  members one by one instead."""


def check_population(configs: list[ml_collections.ConfigDict], workdirs: list[str]) -> None:
  """Raises unless `configs` differ only in POPULATION_FIELDS and `workdirs` are distinct."""
  if not configs or len(configs) != len(workdirs):
    raise ValueError(f"a population needs one workdir per config (got {len(configs)} configs, "
                     f"{len(workdirs)} workdirs)")
  if len({os.path.abspath(w) for w in workdirs}) != len(workdirs):
    raise ValueError(f"the workdirs of a population must be distinct: {workdirs}")
  base = _flat(json.loads(configs[0].to_json_best_effort()))
  for i, config in enumerate(configs[1:], 1):
    flat = _flat(json.loads(config.to_json_best_effort()))
    differ = [k for k in sorted(set(base) | set(flat))
              if base.get(k) != flat.get(k) and k not in POPULATION_FIELDS]
    if differ:
      raise config_lib.ConfigError(
          f"the members of a population may differ only in {', '.join(POPULATION_FIELDS)}; member "
          f"{i} differs from member 0 in " + ", ".join(f"config.{k} ({flat.get(k)!r}, not "
                                                         f"{base.get(k)!r})" for k in differ))
  if len(configs) > 1 and configs[0].train.parallelism == "fsdp":
    raise PopulationError("config.train.parallelism='fsdp' shards each parameter over the devices; "
                          "a population (a member axis on every parameter) trains data parallel "
                          "only: train these runs one by one, or use parallelism='data'")


def _lock_all(workdirs: list[str]) -> list[WorkdirLock]:
  """Locks every workdir (the first process locks for all), or none: WorkdirBusy names the first
  one another live run holds."""
  locks: list[WorkdirLock] = []
  for workdir in workdirs:
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir)
    busy: WorkdirBusy | None = None
    if parallel.is_primary():
      try:
        lock.acquire()
      except WorkdirBusy as err:
        busy = err
    if parallel.any_process(busy is not None):
      for held in locks:
        held.release()
      raise busy or WorkdirBusy(f"workdir {workdir} is in use by another run (see process 0)")
    locks.append(lock)
  return locks


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at: int | None = None, mesh: Mesh | None = None,
                       restart: bool = False) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last eval metrics
  (when this invocation evaluated nothing, the last ones logged in the workdir).

  `stop_at` ends this invocation after that step with a checkpoint, as a preemption would (the
  schedule still follows `config.train.num_steps`); rerunning resumes from there. `mesh` defaults to
  every device of every process (`parallel.make_mesh()`). When every checkpoint of the workdir fails
  to restore, the run stops with CheckpointsUnreadable unless `restart` allows starting from step 0.
  The workdir is locked for the run (WorkdirBusy when another live run holds it).
  """
  config_lib.validate(config)
  locks = _lock_all([workdir])
  try:
    return _train([config], [workdir], stop_at=stop_at, mesh=mesh, restart=restart)[0]
  finally:
    locks[0].release()


def train_and_evaluate_many(configs: list[ml_collections.ConfigDict], workdirs: list[str], *,
                            stop_at: int | None = None, mesh: Mesh | None = None,
                            restart: bool = False) -> list[dict[str, float] | Exception]:
  """Trains a population: runs that differ only in config.train.learning_rate and config.seed,
  as one vmapped program (a member axis on the train state) through the same loop as
  `train_and_evaluate`. Each member keeps its own workdir, holding what a single run of its config
  holds (checkpoints of its own state, TensorBoard events, config.json), so `train_and_evaluate`,
  `runs.load_run` and `ssm_lab.generate` read it as an ordinary run.

  What varies: `config.seed` seeds the parameter initialisation only; the batches follow
  config.task (its `seed` included), which the members share, so every member sees the same batch
  of every step, as its single run would. A member's learning rate scales its updates (the schedule
  is built with peak 1.0), so it matches its single run up to float rounding.

  Returns one entry per member: its last eval metrics, or the exception that stopped it (a member
  with `max_bad_steps` non-finite steps in a row is frozen and gets the FloatingPointError its
  single run would raise; the others go on). A population resumes when every member's latest
  checkpoint is at the same step; otherwise PopulationError (train them one by one). With one
  config this is `train_and_evaluate`.
  """
  for config in configs:
    config_lib.validate(config)
  check_population(configs, workdirs)
  if len(configs) == 1:
    try:
      return [train_and_evaluate(configs[0], workdirs[0], stop_at=stop_at, mesh=mesh,
                                 restart=restart)]
    except FloatingPointError as err:
      return [err]
  locks = _lock_all(workdirs)
  try:
    return _train(configs, workdirs, stop_at=stop_at, mesh=mesh, restart=restart)
  finally:
    for lock in locks:
      lock.release()


class _Member:
  """The per-run side of a (possibly one-member) population: its config, workdir, checkpoints,
  writers and divergence bookkeeping."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.ckpt: Checkpointer | None = None
    self.train_writer: Any = _NullWriter()
    self.eval_writer: Any = _NullWriter()
    self.init_norm: float | None = None
    self.changed = ""
    self.saved: set[int] = set()   # steps already on disk
    self.last_good: int | None = None  # the newest checkpoint on disk
    self.last_eval: dict[str, float] = {}
    self.error: Exception | None = None  # set when the member diverged (frozen from then on)


def _diverged(t: ml_collections.ConfigDict, step: int, last_good: int | None) -> FloatingPointError:
  resume = (f"resumes from step {last_good}, the last checkpoint whose loss was finite and "
            f"whose weights were sane" if last_good is not None else
            "starts from step 0 (no healthy checkpoint was written)")
  return FloatingPointError(
      f"{t.max_bad_steps} consecutive steps had a non-finite loss or gradient (by step "
      f"{step}); stopping without checkpointing the diverged state. Lower "
      f"config.train.learning_rate (now {t.learning_rate:g}; e.g. "
      f"--config.train.learning_rate={t.learning_rate / 10:g}) or check the data: "
      f"rerunning with the same --workdir {resume}.")


def _train(configs: list[ml_collections.ConfigDict], workdirs: list[str], *, stop_at: int | None,
           mesh: Mesh | None, restart: bool) -> list[dict[str, float] | Exception]:
  """The loop, for one run (a plain TrainState, raising on divergence) or a population of R > 1
  members (a TrainState with a leading member axis and a vmapped step; a diverged member is frozen
  and its error returned in its place)."""
  config = configs[0]  # the members differ only in POPULATION_FIELDS
  t = config.train
  size = len(configs)
  stacked = size > 1
  mesh = parallel.make_mesh() if mesh is None else mesh
  _check_mesh_fits(t, mesh)
  task = make_task(config.task)
  model = build_model(config.model, vocab_size=task.vocab_size,
                      num_classes=getattr(task, "num_classes", 0) or None)
  kind = task.kind
  if (kind in ("classification", "group_ranking")) != (model.args.head == "classifier"):
    raise config_lib.ConfigError(f"config.model.head={model.args.head!r} does not fit task "
                                 f"{task.name!r} of kind {kind!r} (use 'classifier' for "
                                 f"classification and ranking tasks, 'lm' otherwise)")
  group = None
  if kind == "group_ranking":
    group = (task.loss, task.group_size)
    # Groups are consecutive rows: they must not be cut by micro-batches or devices.
    if t.grad_accum_steps != 1 or t.batch_size % (task.group_size * mesh.size):
      raise config_lib.ConfigError(
          f"config.train.batch_size={t.batch_size} must be a multiple of config.task.group_size="
          f"{task.group_size} times the {mesh.size} device(s), and config.train.grad_accum_steps "
          f"must be 1 (got {t.grad_accum_steps}), so that no group of a grouped ranking loss is cut")
  primary = parallel.is_primary()
  say = print if primary else (lambda *a, **k: None)

  tx = make_optimizer(t, configs[0].model.pattern, unit_lr=stacked)
  init_one = _state_initializer(task, model, tx)
  keys = [jax.random.PRNGKey(c.seed) for c in configs]
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  # One member's state: what each workdir's checkpoints hold.
  abstract1 = jax.eval_shape(init_one, keys[0])
  shardings1 = parallel.state_shardings(abstract1, mesh, t.parallelism)
  abstract1 = jax.tree.map(with_sharding, abstract1, shardings1)
  if stacked:
    init_state, rng = jax.vmap(init_one), jnp.stack(keys)
    abstract = jax.eval_shape(init_state, rng)
    shardings = parallel.state_shardings(abstract, mesh, t.parallelism)  # replicated: no FSDP
    abstract = jax.tree.map(with_sharding, abstract, shardings)
  else:
    init_state, rng, abstract, shardings = init_one, keys[0], abstract1, shardings1

  repl = parallel.replicated(mesh)
  rows = parallel.batch_sharding(mesh)
  param_sh = shardings.params if t.parallelism == "fsdp" and mesh.size > 1 else None
  step_kw = dict(model=model, kind=kind, tx=tx, accum=t.grad_accum_steps, mesh=mesh,
                 param_shardings=param_sh, group=group)
  # Shapes from a one-row batch (a full one would cost a data step and be drawn twice).
  sample = task.train_batch(0, 1)
  batch_shape = {k: jax.ShapeDtypeStruct((t.batch_size,) + np.shape(v)[1:], np.asarray(v).dtype,
                                         sharding=rows)
                 for k, v in sample.items()}
  if stacked:
    step_jit = jax.jit(functools.partial(population_step, **step_kw),
                       in_shardings=(shardings, rows, repl, repl), out_shardings=(shardings, repl),
                       donate_argnums=0)
    member_shapes = (jax.ShapeDtypeStruct((size,), jnp.float32, sharding=repl),
                     jax.ShapeDtypeStruct((size,), jnp.bool_, sharding=repl))
  else:
    step_jit = jax.jit(functools.partial(train_step, **step_kw),
                       in_shardings=(shardings, rows), out_shardings=(shardings, repl),
                       donate_argnums=0)
    member_shapes = ()
  # Compile before allocating anything, and stop here if the step cannot fit the device (rather
  # than dying with RESOURCE_EXHAUSTED after the data step and the restore).
  step_fn = step_jit.lower(abstract, batch_shape, *member_shapes).compile()
  check_step_memory(step_fn, config)

  members = [_Member(c, w) for c, w in zip(configs, workdirs, strict=True)]
  bar = None
  try:
    restored = []
    for m in members:
      # The previous invocation's config, to log what a rerun changed (a lower learning rate after
      # a divergence, say) before config.json records the new one.
      previous_config = None
      if os.path.exists(os.path.join(m.workdir, "config.json")):
        with open(os.path.join(m.workdir, "config.json")) as f:
          previous_config = f.read()
      if primary:
        with open(os.path.join(m.workdir, "config.json"), "w") as f:
          f.write(m.config.to_json_best_effort(indent=2))
        # Tasks with artifacts a run needs later (a trained tokenizer, the data description) keep
        # them with the run, so `ssm_lab.generate` and `runs.load_run` work from the workdir alone.
        save_artifacts = getattr(task, "save_artifacts", None)
        if callable(save_artifacts):
          save_artifacts(m.workdir)

      m.ckpt = Checkpointer(m.workdir, keep=t.keep_checkpoints, save_every=t.checkpoint_every)
    if stacked:
      _align_population(members, say)
    for m in members:
      got = m.ckpt.restore_latest(abstract1)
      if got is None and m.ckpt.set_aside and not restart:
        listing = "; ".join(f"step {a.step} -> {a.path} ({a.reason})" for a in m.ckpt.set_aside)
        raise CheckpointsUnreadable(
            f"no checkpoint in {m.ckpt.directory} could be restored, so the run did not start over "
            f"from step 0 on its own. Set aside: {listing}. To start fresh, rerun with --restart "
            f"(or use a new --workdir)")
      if got is not None:
        start, _, meta = got
        if meta.get("data_position", start) != start:
          raise RuntimeError(f"checkpoint {start} in {m.ckpt.directory} records data position "
                             f"{meta.get('data_position')}, not its step")
        m.init_norm = meta.get("init_param_norm")
        changes = config_changes(previous_config or meta.get("config"), m.config)
        m.changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        m.last_good = start
      restored.append(got)
    starts = [got[0] if got is not None else 0 for got in restored]
    if len(set(starts)) > 1:
      raise PopulationError(
          "the members of this population are at different steps ("
          + ", ".join(f"{m.workdir}: {s}" for m, s in zip(members, starts, strict=True))
          + "), so they cannot train as one program: train them one by one")
    start = starts[0]
    if all(got is None for got in restored):
      # Random draws do not depend on the sharding (partitionable threefry), so every mesh starts
      # from the same parameters.
      state = jax.jit(init_state, out_shardings=shardings)(rng)
      if t.init_from:
        # Each member's fresh parameters, overwritten where the source model has the same array.
        host = jax.device_get(state.params)
        picked = [init_params_from(t.init_from, host if not stacked else
                                   jax.tree.map(lambda x: x[i], host)) for i in range(size)]  # noqa: B023
        params = picked[0][0] if not stacked else jax.tree.map(
            lambda *x: np.stack(x), *[p for p, _ in picked])
        opt_init = jax.vmap(tx.init) if stacked else tx.init
        state = state.replace(params=jax.device_put(params, shardings.params),
                              opt_state=jax.jit(opt_init, out_shardings=shardings.opt_state)(params))
        say(f"initialised from {t.init_from}; freshly initialised: {picked[0][1] or 'nothing'}")
      for m in members:
        if m.ckpt.set_aside:
          say(f"--restart: starting from step 0; {len(m.ckpt.set_aside)} unreadable checkpoint(s) "
              f"are in {m.ckpt.directory}_unreadable")
    else:
      states = [got[1] for got in restored]
      state = states[0] if not stacked else jax.jit(
          lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s), out_shardings=shardings)(*states)
      del states, restored
      for m in members:
        say(f"resumed from step {start} in {m.ckpt.directory}"
            + (f" with a changed config: {m.changed}" if m.changed else ""))

    if stacked:
      take = jax.jit(lambda s, i: jax.tree.map(lambda x: x[i], s), out_shardings=shardings1)
      member_state = lambda i: take(state, i)  # member i's own TrainState (what it checkpoints)
    else:
      member_state = lambda i: state
    for i, m in enumerate(members):
      if m.init_norm is None:  # a fresh run, or a checkpoint from before the norm was recorded
        m.init_norm = float(jax.device_get(_param_health(member_state(i).params)[1]))

    n_params = param_count(abstract1.params)
    seq_len = task.seq_len
    fpt = flops_per_token(model.args, seq_len)
    peak = _peak_flops(t)
    say(f"model {model.args.pattern!r}: {n_params:,} parameters, {fpt:.3g} training FLOPs/token; "
        f"task {task.name!r} ({kind}), vocab {task.vocab_size}, length {seq_len}; "
        f"{t.parallelism} over {mesh.size} device(s) in {jax.process_count()} process(es)"
        + (f"; a vmapped population of {size} (learning rates "
           f"{[c.train.learning_rate for c in configs]}, seeds {[c.seed for c in configs]})"
           if stacked else ""))
    for m in members:
      if primary:
        m.train_writer = SummaryWriter(os.path.join(m.workdir, "train"))
        m.eval_writer = SummaryWriter(os.path.join(m.workdir, "eval"))
      if start == 0:
        hp = {f"model.{k}": v for k, v in m.config.model.items()}
        hp.update({f"train.{k}": v for k, v in m.config.train.items()})
        hp.update({"task.name": m.config.task.name, "params": n_params, "devices": mesh.size,
                   "processes": jax.process_count()})
        m.train_writer.hparams(hp, ["eval/loss", "eval/accuracy", "train/loss"])
        m.train_writer.text(0, "config",
                            "```\n" + m.config.to_json_best_effort(indent=2) + "\n```")
      elif m.changed:
        m.train_writer.text(start, "config_change", f"resumed from step {start} with {m.changed}")

    def eval_params(params, batch):
      if param_sh is not None:
        params = jax.lax.with_sharding_constraint(params, repl)
      return eval_step(params, batch, model=model, kind=kind, group=group)
    eval_fn = jax.jit(jax.vmap(eval_params, in_axes=(0, None)) if stacked else eval_params,
                      in_shardings=(shardings.params, rows), out_shardings=repl)
    schedules = [make_schedule(c.train) for c in configs]
    eval_bs = t.eval_batch_size or t.batch_size
    profile = tuple(int(s) for s in t.profile_steps.split(":")) if t.profile_steps else None
    hooks = data_base.optional_hooks(task)
    scorer = _scorer(model, mesh, shardings1)
    tracing = False
    for m in members:
      m.saved = {start}  # a preemption can land on a regular checkpoint step
    if stacked:
      lrs = jax.device_put(np.array([c.train.learning_rate for c in configs], np.float32), repl)
      active = np.ones(size, bool)
      member_args: tuple = (lrs, jax.device_put(active, repl))
    else:
      member_args = ()

    def unhealthy(i: int) -> str | None:
      """Why member i's current state must not be checkpointed (None: it may)."""
      m, s = members[i], member_state(i)
      bad = int(jax.device_get(s.consecutive_bad))
      if bad:
        return f"its last {bad} step(s) had a non-finite loss or gradient"
      finite, norm = (jax.device_get(x) for x in _param_health(s.params))
      if not finite:
        return "its parameters are not finite"
      if norm > SANE_NORM_GROWTH * max(m.init_norm, 1e-12):
        return (f"its parameters' norm {float(norm):.3g} is over {SANE_NORM_GROWTH:g} times the "
                f"initial {m.init_norm:.3g} (diverging)")
      return None

    def save(i: int, step: int, force: bool = False) -> bool:
      m = members[i]
      if m.error is not None:  # frozen on its way to divergence: its newest checkpoint stays
        return False
      if step in m.saved or not (force or step % t.checkpoint_every == 0):
        return step in m.saved
      # Never write a state on its way to divergence: the newest checkpoint stays one a rerun with
      # a lower learning rate can resume from.
      why = unhealthy(i)
      if why is not None:
        say(f"not checkpointing step {step}"
            + (f" of {m.workdir}" if stacked else "") + f": {why}; the newest checkpoint stays "
            + (f"step {m.last_good}" if m.last_good is not None else "none (step 0)"))
        return False
      m.ckpt.save(step, member_state(i), {"data_position": step,
                                          "config": m.config.to_json_best_effort(),
                                          "init_param_norm": m.init_norm}, force=True)
      m.saved.add(step)
      m.last_good = step
      return True

    pending: list[dict] = []
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm.tqdm(total=t.num_steps, initial=start, disable=not (t.progress_bar and primary),
                    unit="step", dynamic_ncols=True)
    lagged = None
    batches = _Prefetcher(task, t.batch_size, min(t.num_steps, stop_at or t.num_steps))
    try:
      with _Preempted(install=jax.process_count() == 1) as preempted:
        step = start
        while step < t.num_steps:
          if profile and step == profile[0]:
            jax.profiler.start_trace(os.path.join(members[0].workdir, "profile"))
            tracing = True
          batch = parallel.shard_batch(batches.get(step), mesh)
          state, metrics = step_fn(state, batch, *member_args)
          step += 1
          window_steps += 1
          pending.append(metrics)
          if tracing and step == profile[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            tracing = False
          # Read the previous step's counter (one step behind) so the host never stalls the device.
          if lagged is not None:
            bad = np.atleast_1d(np.asarray(jax.device_get(lagged)))
            for i in np.flatnonzero(bad >= t.max_bad_steps):
              m = members[i]
              if m.error is not None:
                continue
              err = _diverged(m.config.train, step, m.last_good)
              if not stacked:
                raise err
              m.error = err
              active[i] = False
              member_args = (lrs, jax.device_put(active, repl))
              say(f"{m.workdir}: {err} The other members of the population go on.")
            if all(m.error is not None for m in members):
              break
          lagged = metrics["consecutive_bad"]
          if step % t.log_every == 0 or step == t.num_steps:
            fetched = jax.device_get(pending)
            elapsed = time.perf_counter() - window_start
            tokens = window_steps * t.batch_size * seq_len
            skipped = np.atleast_1d(jax.device_get(state.skipped))
            mem = _peak_memory_bytes()
            shown = []
            for i, m in enumerate(members):
              if m.error is not None:
                continue
              mine = fetched if not stacked else [{k: v[i] for k, v in f.items()} for f in fetched]
              count = max(sum(f["count"] for f in mine), 1.0)
              scalars = {
                  "loss": sum(f["loss_sum"] for f in mine) / count,
                  "accuracy": sum(f["correct"] for f in mine) / count,
                  "grad_norm": float(np.mean([f["grad_norm"] for f in mine])),
                  "learning_rate": float(schedules[i](step - 1)),
                  "step_time_s": elapsed / window_steps,
                  # A member's own tokens: the population as a whole processes `size` times these.
                  "tokens_per_s": tokens / elapsed,
                  "skipped_steps": float(skipped[i]),
              }
              if peak:
                # Model FLOPs over the peak of every device the step ran on.
                scalars["mfu"] = fpt * scalars["tokens_per_s"] / (peak * mesh.size)
              if mem:
                scalars["peak_memory_gib"] = mem / 2**30
              m.train_writer.scalars(step, scalars)
              shown.append(scalars)
            if stacked:
              bar.set_postfix(loss="/".join(f"{s['loss']:.3f}" for s in shown))
            elif shown:
              bar.set_postfix(loss=f"{shown[0]['loss']:.3f}", acc=f"{shown[0]['accuracy']:.3f}")
            pending.clear()
            window_start, window_steps = time.perf_counter(), 0
          if step % t.eval_every == 0 or step == t.num_steps:
            totals = _eval_totals(state.params, task, eval_fn, eval_bs, mesh)
            for i, m in enumerate(members):
              if m.error is not None:
                continue
              m.last_eval = _eval_metrics({k: float(np.reshape(v, -1)[i] if stacked else v)
                                           for k, v in totals.items()}, task)
              if "evaluate" in hooks:
                m.last_eval.update(hooks["evaluate"](scorer(member_state(i).params)))
              m.eval_writer.scalars(step, m.last_eval)
              m.eval_writer.flush()
              if primary:
                bar.write(f"step {step}" + (f" ({m.workdir})" if stacked else "") + ": "
                          + ", ".join(f"eval {k} {v:.4g}" for k, v in m.last_eval.items()))
            window_start = time.perf_counter()  # keep evaluation out of the throughput numbers
          for i in range(size):
            save(i, step, force=step == t.num_steps or step == stop_at)
          bar.update(1)
          if step == stop_at:
            break
          if preempted.reached(step):
            for i, m in enumerate(members):
              if m.error is not None:
                continue
              if save(i, step, force=True) and primary:
                bar.write(f"SIGTERM: checkpointed step {step} in {m.ckpt.directory}; rerun to resume")
              elif primary:
                bar.write(f"SIGTERM: stopped at step {step} without a checkpoint; rerun to resume "
                          f"from step {m.last_good if m.last_good is not None else 0}")
            break
    finally:
      batches.close()
      if tracing:
        jax.profiler.stop_trace()
  finally:
    if bar is not None:
      bar.close()
    for m in members:
      m.train_writer.close()
      m.eval_writer.close()
      if m.ckpt is not None:
        m.ckpt.close()
  out: list[dict[str, float] | Exception] = []
  for m in members:
    if m.error is not None:
      out.append(m.error)
    else:
      out.append(m.last_eval or (_last_logged(m.workdir) if primary else {}))
  return out


def _scorer(model: LanguageModel, mesh: Mesh, shardings: Any):
  """scorer(params) -> score_fn(batch) -> np.ndarray of model outputs, for a task's `evaluate` hook
  (compiled once per run; batches are padded to a multiple of the device count and unpadded)."""
  repl = parallel.replicated(mesh)

  @functools.partial(jax.jit, in_shardings=(shardings.params, parallel.batch_sharding(mesh)),
                     out_shardings=repl)
  def score(p, b):
    return model.apply({"params": jax.lax.with_sharding_constraint(p, repl)}, b["inputs"],
                       **_model_inputs(b))

  def bind(params):
    def run(batch):
      device_batch, real = _sharded(batch, mesh)
      return np.asarray(jax.device_get(score(params, device_batch)))[:real]
    return run
  return bind


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, config.")
flags.DEFINE_string("profile_steps", None, "'start:stop': write a jax.profiler trace of those steps "
                    "to <workdir>/profile (TensorBoard's profile tab); sets "
                    "config.train.profile_steps.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run "
                    "(default: $JAX_COORDINATOR_ADDRESS; none: single process).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run "
                     "(default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                     "(default: $JAX_PROCESS_ID).")
flags.DEFINE_bool("restart", False, "Start from step 0 when every checkpoint of --workdir is "
                  "unreadable (they stay in <workdir>/checkpoints_unreadable).")
flags.DEFINE_bool("verbose", False, "Print the traceback of an error, not just its one-line message.")


def _unknown_override(argv: list[str]) -> str | None:
  """A message naming the first --config.<path> override whose path the schema does not know.

  Only model, train and top-level fields are checked here: task fields depend on the task and are
  checked by its builder.
  """
  schema = config_lib.base_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node, prefix = schema, "config"
    for key in path:
      if not isinstance(node, ml_collections.ConfigDict) or prefix == "config.task":
        break
      moved = registry.renamed_fields().get(key) if prefix == "config.model" else None
      if key not in node and moved:
        return (f"config.model.{key} moved to " + " / ".join(f"config.model.{m}" for m in moved)
                + f" (in {arg}; mixer fields live in their mixer's group)")
      if key not in node:
        close = difflib.get_close_matches(key, list(node.keys()), n=1)
        hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
        return (f"unknown config field '{prefix}.{key}' in {arg}{hint}; known fields of "
                f"'{prefix}': {sorted(node.keys())}")
      node, prefix = node[key], f"{prefix}.{key}"
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-override mistakes reported as one clear line."""
  message = _unknown_override(argv)
  if message is None:
    try:
      return FLAGS(argv)
    except flags.Error as err:  # ill-typed values and the like: absl's message says which flag
      message = str(err)
    except (AttributeError, KeyError) as err:  # config_flags' answer to an unknown (task) field
      detail: Any = err
      while isinstance(detail, BaseException) and detail.args:
        detail = detail.args[0]
      overrides = [a for a in argv if a.startswith("--config.")]
      message = (f"unknown config field {str(detail).splitlines()[0]} in one of {overrides}: "
                 + " ".join(str(detail).splitlines()[1:]))
  cli.fail("ssm_lab.train", f"flags parsing error: {message}")


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    cli.fail("ssm_lab.train", f"unexpected arguments: {argv[1:]}")
  cli.run("ssm_lab.train", _main, errors=cli.USER_ERRORS + (RunError, WorkdirBusy))


def _main() -> None:
  config = FLAGS.config  # a config file that failed to load raises OSError naming it here
  if config is None or FLAGS.workdir is None:
    raise ValueError("--config and --workdir are required")
  if FLAGS.profile_steps is not None:
    config.train.profile_steps = FLAGS.profile_steps
  config_lib.validate(config)  # before joining a multi-process run, and before compiling
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  metrics = train_and_evaluate(config, FLAGS.workdir, restart=FLAGS.restart)
  if parallel.is_primary():
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v)
                      for k, v in metrics.items()}))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
