"""The configuration schema: every field a run can set, with its default and type.

Config files (`configs/*.py`) define `get_config()` that starts from `base_config()` and changes what
they need. `validate(config)` runs before anything compiles: a field the schema does not know, a value
of the wrong type or an inconsistent setting raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from ssm_lab.errors import ConfigError
from ssm_lab.layers import registry

# {letter: description} of every registered mixer (ssm_lab.layers.registry).
LAYER_LETTERS = registry.letters()

__all__ = ["ConfigError", "LAYER_LETTERS", "base_config", "load_config", "model_defaults", "validate"]


def model_defaults() -> ml_collections.ConfigDict:
  """`config.model`: the stack's own fields, then one group per mixer (`config.model.<group>`) with
  the fields its registry entry declares."""
  cfg = ml_collections.ConfigDict(dict(
      pattern="MMMM",          # one letter per block, see LAYER_LETTERS
      d_model=128,
      vocab_size=-1,           # -1: take the task's vocabulary size
      block_mlp=False,         # a SwiGLU sublayer after each mixer (Transformer/Jamba style)
      d_ff=0,                  # MLP hidden width; 0: round(8/3 * d_model) to a multiple of 64
      tie_embeddings=True,
      norm_eps=1e-5,
      # numerics and heads
      dtype="float32",         # compute dtype of activations: float32 or bfloat16
      param_dtype="float32",
      head="lm",               # "lm" (next-token logits) or "classifier" (pooled logits)
      num_classes=0,           # classifier: number of classes; 0 takes the task's
      pooling="last",          # classifier: "last" (last real token) or "mean"
      remat="none",            # rematerialisation policy: none | block | dots
  ))
  for name, spec in registry.groups().items():
    cfg[name] = ml_collections.ConfigDict(dataclasses.asdict(spec.config()))
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run, with defaults. Config files copy and change this."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      task=ml_collections.ConfigDict(dict(name="mqar")),  # task fields depend on the task name
      model=model_defaults(),
      train=ml_collections.ConfigDict(dict(
          batch_size=64,
          num_steps=1000,
          learning_rate=1e-3,
          warmup_steps=100,
          min_lr_ratio=0.1,        # cosine decays to learning_rate * min_lr_ratio
          weight_decay=0.1,
          b1=0.9,
          b2=0.98,
          grad_clip_norm=1.0,
          grad_accum_steps=1,
          log_every=10,
          eval_every=100,
          eval_batch_size=0,       # 0: same as batch_size
          checkpoint_every=200,
          keep_checkpoints=3,
          max_bad_steps=10,        # consecutive non-finite steps before the run stops
          progress_bar=True,
          profile_steps="",       # "start:stop" writes a jax.profiler trace over those steps
          peak_flops=0.0,          # device peak for MFU; 0: look it up from the device kind
          parallelism="dp",        # over all devices: "dp" (replicated params) or "fsdp" (sharded)
          init_from="",            # a fresh run starts from this run directory's (or Hugging Face
                                   # model directory's) parameters where path and shape match
      )),
  ))


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path`: lets a config file start from a sibling's."""
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location(f"ssm_lab_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


_TYPES = {bool: (bool,), int: (int,), float: (float, int), str: (str,)}


def _check_against(cfg: Any, schema: Any, prefix: str) -> None:
  for key in cfg.keys():
    path = f"{prefix}.{key}"
    if key not in schema:
      raise ConfigError(f"unknown config field {path!r}; known fields of {prefix!r}: "
                        f"{sorted(schema.keys())}")
    value, default = cfg[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config field {path!r} must be a group of fields, got {value!r}")
      _check_against(value, default, path)
    else:
      allowed = _TYPES.get(type(default))
      if allowed and (not isinstance(value, allowed) or (type(default) is not bool
                                                         and isinstance(value, bool))):
        raise ConfigError(f"config field {path!r} must be {type(default).__name__}, got "
                          f"{value!r} ({type(value).__name__})")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first unknown, ill-typed or inconsistent field."""
  schema = base_config()
  for key in config.keys():
    if key not in schema:
      raise ConfigError(f"unknown config field 'config.{key}'; known: {sorted(schema.keys())}")
  if "model" in config:
    moved = registry.renamed_fields()
    for key in config.model.keys():
      if key in moved and key not in schema.model:
        raise ConfigError(f"config.model.{key} moved to "
                          + " / ".join(f"config.model.{new}" for new in moved[key])
                          + " (mixer fields live in their mixer's group)")
  for group in ("model", "train"):
    if group in config:
      _check_against(config[group], schema[group], f"config.{group}")
  if "task" not in config or "name" not in config.task:
    raise ConfigError("config.task.name is required (for example 'mqar')")
  m = config.model
  letters = registry.letters()
  bad = sorted(set(m.pattern) - set(letters))
  if not m.pattern or bad:
    raise ConfigError(f"config.model.pattern={m.pattern!r} has unknown letters {bad}; letters: "
                      + ", ".join(f"{k} = {v}" for k, v in letters.items()))
  if m.d_model < 1:
    raise ConfigError(f"config.model.d_model must be >= 1, got {m.d_model}")
  args = None
  for letter in dict.fromkeys(m.pattern):
    spec = registry.get(letter)
    if spec.validate is None:
      continue
    if args is None:
      from ssm_lab.models.lm import ModelArgs  # noqa: PLC0415 (models import this module)
      args = ModelArgs.from_config(m, vocab_size=max(m.vocab_size, 1))
    spec.validate(args, args.group(spec.name), f"config.model.{spec.name}")
  for field, choices in (("dtype", ("float32", "bfloat16")), ("param_dtype", ("float32",
                                                                              "bfloat16")),
                         ("head", ("lm", "classifier")), ("pooling", ("last", "mean")),
                         ("remat", ("none", "block", "dots"))):
    if m[field] not in choices:
      raise ConfigError(f"config.model.{field}={m[field]!r} must be one of {list(choices)}")
  t = config.train
  for field in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints", "grad_accum_steps", "max_bad_steps"):
    if t[field] < 1:
      raise ConfigError(f"config.train.{field} must be >= 1, got {t[field]}")
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"config.train.batch_size={t.batch_size} must be divisible by "
                      f"config.train.grad_accum_steps={t.grad_accum_steps}")
  if t.learning_rate <= 0:
    raise ConfigError(f"config.train.learning_rate must be > 0, got {t.learning_rate}")
  if t.get("parallelism", "dp") not in ("dp", "fsdp"):
    raise ConfigError(f"config.train.parallelism={t.parallelism!r} must be one of ['dp', 'fsdp']")
  if t.get("profile_steps", ""):
    parts = t.profile_steps.split(":")
    if (len(parts) != 2 or not all(p.strip().isdigit() for p in parts)
        or int(parts[0]) >= int(parts[1])):
      raise ConfigError(f"config.train.profile_steps={t.profile_steps!r} must be 'start:stop' with "
                        f"0 <= start < stop (steps to trace), or '' for none")
