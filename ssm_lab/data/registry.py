"""Task names -> builders. `make_task(config.task)` is how `ssm_lab.train` gets its data.

A builder takes the `config.task` ConfigDict (whose `name` selects it) and returns a `Task`.
"""

from __future__ import annotations

from typing import Any, Callable

from ssm_lab.data.base import Task

_BUILDERS: dict[str, Callable[[Any], Task]] = {}


def register(name: str):
  def deco(fn):
    _BUILDERS[name] = fn
    return fn
  return deco


def task_names() -> list[str]:
  return sorted(_BUILDERS)


def make_task(cfg: Any) -> Task:
  """Builds the task that `cfg.name` names, from the other fields of `cfg`."""
  name = cfg.get("name")
  if name not in _BUILDERS:
    raise ValueError(f"config.task.name={name!r} is not a known task; available: {task_names()}")
  return _BUILDERS[name](cfg)


def _fields(cfg: Any, allowed: set[str], task: str) -> dict[str, Any]:
  """cfg minus `name`, after checking every field is one the task knows."""
  given = {k: v for k, v in cfg.items() if k != "name"}
  unknown = sorted(set(given) - allowed)
  if unknown:
    raise ValueError(f"config.task has fields {unknown} that task {task!r} does not take; it takes "
                     f"{sorted(allowed)}")
  return given


@register("mqar")
def _mqar(cfg: Any) -> Task:
  from ssm_lab.data.mqar import MQAR
  allowed = {"vocab_size", "seq_len", "num_kv_pairs", "power_a", "random_non_queries", "seed",
             "num_eval_examples"}
  return MQAR(**_fields(cfg, allowed, "mqar"))
