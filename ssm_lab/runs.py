"""Open a finished (or running) training run: its config, model, latest parameters and curves.

Used by the notebooks, `ssm_lab.generate` and anything else that reads a workdir written by
`ssm_lab.train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from ssm_lab.data import make_task
from ssm_lab.metrics import read_scalars
from ssm_lab.models import LanguageModel, build_model


@dataclasses.dataclass
class Run:
  workdir: str
  config: ml_collections.ConfigDict
  model: LanguageModel
  params: Any
  step: int
  task: Any

  def curves(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{"train": {tag: [(step, value)]}, "eval": {...}} from the run's TensorBoard events."""
    return {split: read_scalars(os.path.join(self.workdir, split)) for split in ("train", "eval")
            if os.path.isdir(os.path.join(self.workdir, split))}

  def apply(self, tokens: jax.Array, **kw: Any) -> jax.Array:
    return self.model.apply({"params": self.params}, tokens, **kw)


def load_run(workdir: str, step: int | None = None) -> Run:
  """The run in `workdir` at checkpoint `step` (default: the latest).

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
  """
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir!r} a run directory written by "
                            f"ssm_lab.train?")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = make_task(config.task)
  model = build_model(config.model, vocab_size=task.vocab_size,
                      num_classes=getattr(task, "num_classes", 0) or None)
  step, params = restore_params(workdir, step)
  return Run(workdir, config, model, params, step, task)


def restore_params(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, parameters) of the run in `workdir` at checkpoint `step` (default: the latest)."""
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    mngr.close()
  return int(step), restored["state"]["params"]
