"""Fine-tuning a cross-encoder with grouped losses (RankMamba's recipe), starting from a backbone.

  model, params = finetune(task, config, init=lm_params, workdir=DIR)

`task` is a `RankingTask` with loss "lce" or "bce": its batches are groups of `group_size` rows (the
positive first). The model is `config.model` with a classifier head of one output read at the EOS
token; "lce" is softmax cross-entropy over each group's scores (localized contrastive estimation),
"bce" sigmoid cross-entropy per row (the pointwise ablation). AdamW with linear warmup then linear
decay to 0, as RankMamba's trainer. `init` is a language model's parameter tree (for example
`ssm_lab.runs.load_run(pretrain_dir).params`): every parameter but the new head is copied from it.

Why not `ssm_lab.train`: its loss is per row (classification or next token), and a grouped softmax
needs the rows of a group together; see experiments/ranking/README.md for the hook that would let the
one loop train this. The learning rate is an argument of the compiled step, so an lr sweep over the
same shapes compiles once. With `workdir`, the result is a run directory `ssm_lab.rank` reads:
config.json, tokenizer.json and checkpoints/<steps>/ (orbax, `state.params`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from ssm_lab.checkpoint import Checkpointer
from ssm_lab.data.ranking.task import RankingTask
from ssm_lab.models import LanguageModel, build_model
from ssm_lab.train import decay_mask


def _loss(params: Any, batch: dict[str, jax.Array], *, model: LanguageModel, loss: str,
          group: int) -> jax.Array:
  scores = model.apply({"params": params}, batch["inputs"], pad_mask=batch["pad_mask"])[:, 0]
  if loss == "lce":
    logits = scores.reshape(-1, group)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.zeros(logits.shape[0], jnp.int32)))
  return jnp.mean(optax.sigmoid_binary_cross_entropy(scores, batch["labels"].astype(jnp.float32)))


@functools.lru_cache(maxsize=16)
def _step_fn(args: Any, loss: str, group: int, weight_decay: float, clip: float):
  """(params, opt_state, batch, lr) -> (params, opt_state, loss), compiled once per architecture
  (keyed by its ModelArgs, so every seed, fold and learning rate reuses one compilation)."""
  model = LanguageModel(args)
  tx = optax.chain(optax.clip_by_global_norm(clip),
                   optax.inject_hyperparams(optax.adamw, static_args=("mask",))(learning_rate=0.0,
                                                         weight_decay=weight_decay,
                                                         mask=decay_mask))

  @jax.jit
  def step(params, opt_state, batch, lr):
    opt_state[1].hyperparams["learning_rate"] = lr
    value, grads = jax.value_and_grad(_loss)(params, batch, model=model, loss=loss, group=group)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return tx, step


def merge_backbone(params: Any, init: Any) -> Any:
  """`params` with every entry that `init` (a language model's tree) has at the same path and shape
  replaced by it; the classifier head stays as initialised.

  Raises:
    ValueError: a backbone parameter is missing from `init` or has another shape (names it).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  src = flax.traverse_util.flatten_dict(flax.core.unfreeze(init))
  for key, value in flat.items():
    if key[0] == "classifier":
      continue
    if key not in src:
      raise ValueError(f"init: backbone parameter {'/'.join(key)} is missing from the pretrained "
                       f"parameters (is it the same architecture?)")
    if tuple(src[key].shape) != tuple(value.shape):
      raise ValueError(f"init: parameter {'/'.join(key)} has shape {tuple(src[key].shape)} in the "
                       f"pretrained model, {tuple(value.shape)} here (vocabulary or width differs)")
    flat[key] = jnp.asarray(src[key], value.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def lr_at(step: int, peak: float, num_steps: int, warmup: int) -> float:
  """Linear warmup to `peak` over `warmup` steps, then linear decay to 0 at `num_steps`."""
  if step < warmup:
    return peak * (step + 1) / warmup
  return peak * max(0.0, (num_steps - step) / max(1, num_steps - warmup))


def finetune(task: RankingTask, config: ml_collections.ConfigDict, *, init: Any = None,
             workdir: str | None = None, progress: bool = True) -> tuple[LanguageModel, Any]:
  """Trains `config.model` (head "classifier", one output) on `task`'s groups for
  `config.train.num_steps` steps of `config.train.batch_size` rows; returns (model, params).

  Uses config.train.{batch_size, num_steps, learning_rate, warmup_steps, weight_decay,
  grad_clip_norm} and config.seed.
  """
  if task.loss not in ("lce", "bce"):
    raise ValueError(f"finetune: task loss {task.loss!r}; the grouped loop trains 'lce' or 'bce' "
                     f"(pointwise tasks train with ssm_lab.train)")
  t = config.train
  if t.batch_size % task.group_size:
    raise ValueError(f"config.train.batch_size={t.batch_size} must be a multiple of "
                     f"config.task.group_size={task.group_size} (whole groups per batch)")
  model = build_model(config.model, vocab_size=task.vocab_size, num_classes=1)
  if model.args.head != "classifier" or model.args.num_classes != 1:
    raise ValueError(f"config.model: head={model.args.head!r}, num_classes="
                     f"{model.args.num_classes}; the grouped loop needs 'classifier' with 1 output")
  sample = task.train_batch(0, task.group_size)
  params = model.init(jax.random.PRNGKey(config.seed), jnp.asarray(sample["inputs"]),
                      pad_mask=jnp.asarray(sample["pad_mask"]))["params"]
  if init is not None:
    params = merge_backbone(params, init)
  tx, step_fn = _step_fn(model.args, task.loss, task.group_size, float(t.weight_decay),
                         float(t.grad_clip_norm))
  opt_state = tx.init(params)
  warmup = max(1, min(t.warmup_steps, t.num_steps // 10 if t.warmup_steps <= 0 else t.warmup_steps))
  bar = tqdm.tqdm(range(t.num_steps), desc="finetune", unit="step", disable=not progress,
                  leave=False)
  losses = []
  for step in bar:
    batch = {k: jnp.asarray(v) for k, v in task.train_batch(step, t.batch_size).items()}
    lr = jnp.asarray(lr_at(step, t.learning_rate, t.num_steps, warmup), jnp.float32)
    params, opt_state, value = step_fn(params, opt_state, batch, lr)
    losses.append(value)
    if (step + 1) % 20 == 0:
      bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses[-20:]))):.3f}")
  final_loss = float(np.mean(jax.device_get(losses[-20:]))) if losses else float("nan")
  if not np.isfinite(final_loss):
    raise FloatingPointError(f"finetune: loss is {final_loss} after {t.num_steps} steps at "
                             f"learning rate {t.learning_rate}; lower config.train.learning_rate")
  if workdir is not None:
    save(workdir, config, task, params, t.num_steps)
  return model, params


def save(workdir: str, config: ml_collections.ConfigDict, task: RankingTask, params: Any,
         step: int) -> None:
  """A run directory `ssm_lab.rank.Scorer.from_workdir` (and `ssm_lab.runs.load_run`) reads."""
  os.makedirs(workdir, exist_ok=True)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.num_classes = 1
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  task.save_artifacts(workdir)
  ckpt = Checkpointer(workdir, keep=1, save_every=1)
  ckpt.save(step, {"step": step, "params": params}, {"data_position": step,
                                                     "config": config.to_json_best_effort()},
            force=True)
  ckpt.wait()
  ckpt.close()
