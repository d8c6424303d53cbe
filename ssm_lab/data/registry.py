"""Task names -> builders. `make_task(config.task)` is how `ssm_lab.train` gets its data.

A builder takes the `config.task` ConfigDict (whose `name` selects it) and returns a `Task`; a field the
task does not take is an error that lists the ones it does (`task_fields(name)`).
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
  return MQAR(**_fields(cfg, _dataclass_fields(MQAR), "mqar"))


def _dataclass_fields(cls: Any) -> set[str]:
  import dataclasses
  return {f.name for f in dataclasses.fields(cls)} - {"name", "kind", "num_classes"}


def _signature_fields(fn: Callable[..., Any]) -> tuple[set[str], set[str]]:
  """(all keyword fields, required ones) of a builder function."""
  import inspect
  params = inspect.signature(fn).parameters
  allowed = {n for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  required = {n for n in allowed if params[n].default is inspect.Parameter.empty}
  return allowed, required


def _call(fn: Callable[..., Any], cfg: Any, task: str) -> Task:
  allowed, required = _signature_fields(fn)
  given = _fields(cfg, allowed, task)
  missing = sorted(required - set(given))
  if missing:
    raise ValueError(f"config.task for task {task!r} needs the fields {missing}")
  return fn(**given)


@register("selective_copying")
def _selective_copying(cfg: Any) -> Task:
  from ssm_lab.data.selective_copying import SelectiveCopying
  return SelectiveCopying(**_fields(cfg, _dataclass_fields(SelectiveCopying), "selective_copying"))


@register("induction_heads")
def _induction_heads(cfg: Any) -> Task:
  from ssm_lab.data.induction_heads import InductionHeads
  return InductionHeads(**_fields(cfg, _dataclass_fields(InductionHeads), "induction_heads"))


@register("word_problem")
def _word_problem(cfg: Any) -> Task:
  from ssm_lab.data.word_problems import WordProblem
  return WordProblem(**_fields(cfg, _dataclass_fields(WordProblem), "word_problem"))


@register("lm")
def _lm(cfg: Any) -> Task:
  from ssm_lab.data.lm import build_lm_task
  return _call(build_lm_task, cfg, "lm")


@register("ranking")
def _ranking(cfg: Any) -> Task:
  from ssm_lab.data.ranking import build_ranking_task
  return _call(build_ranking_task, cfg, "ranking")


def task_fields(name: str) -> set[str]:
  """The `config.task` fields (besides `name`) that task `name` takes."""
  if name in ("mqar", "selective_copying", "induction_heads", "word_problem"):
    import importlib
    module, cls = {"mqar": ("mqar", "MQAR"),
                   "selective_copying": ("selective_copying", "SelectiveCopying"),
                   "induction_heads": ("induction_heads", "InductionHeads"),
                   "word_problem": ("word_problems", "WordProblem")}[name]
    return _dataclass_fields(getattr(importlib.import_module(f"ssm_lab.data.{module}"), cls))
  if name == "lm":
    from ssm_lab.data.lm import build_lm_task
    return _signature_fields(build_lm_task)[0]
  if name == "ranking":
    from ssm_lab.data.ranking import build_ranking_task
    return _signature_fields(build_ranking_task)[0]
  raise ValueError(f"unknown task {name!r}; available: {task_names()}")
