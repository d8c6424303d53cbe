"""What a study is: a folder `experiments/<study>/` whose `sweep.py` lists its runs as data.

A run either trains a config through `ssm_lab.train.train_and_evaluate` (optionally followed by an
`evaluate` of the trained workdir) or calls a measurement function `fn`. Studies never hold a training
loop of their own; `ssm_lab.experiments.runner` runs them all the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import types
from typing import Any, Callable

import ml_collections

ENV_DIR = "SSM_LAB_EXPERIMENTS_DIR"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


@dataclasses.dataclass
class Run:
  """One unit of a study: a training run (`config`, optional `evaluate`) or a measurement (`fn`).

  name: unique within the study; names the result file and the workdir (letters, digits, `_.=+-`).
  config: trained by `train_and_evaluate` in `<out>/<study>/<name>`.
  evaluate: `evaluate(workdir, config) -> dict` after training (e.g. accuracy at other lengths);
    `ssm_lab.runs.load_run(workdir)` opens the trained model. Its metrics join the eval metrics.
  fn: `fn() -> dict` of metrics, for units that measure rather than train (op timings).
  tags: what plots and tables group by, e.g. {"model": "mamba", "d_model": 64, "lr": 1e-3}.
  early_stop: (metric, threshold): stop training once an evaluation reaches it (Zoology stops at
    0.99 accuracy). Training then runs in segments of `config.train.eval_every` steps, one
    `train_and_evaluate` call each (resuming from the checkpoint; each call compiles again).
  """

  name: str
  config: ml_collections.ConfigDict | None = None
  evaluate: Callable[[str, ml_collections.ConfigDict], dict[str, Any]] | None = None
  fn: Callable[[], dict[str, Any]] | None = None
  tags: dict[str, Any] = dataclasses.field(default_factory=dict)
  early_stop: tuple[str, float] | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not _NAME.match(self.name):
      raise ValueError(f"Run.name={self.name!r} must be letters, digits and '_.=+-' (it names a "
                       f"file and a directory)")
    if (self.config is None) == (self.fn is None):
      raise ValueError(f"run {self.name!r}: set exactly one of Run.config (training) or Run.fn "
                       f"(measurement)")
    if self.fn is not None and (self.evaluate is not None or self.early_stop is not None):
      raise ValueError(f"run {self.name!r}: Run.evaluate and Run.early_stop need Run.config, not "
                       f"Run.fn")


def experiments_dir(explicit: str | None = None) -> str:
  """Where studies live: `explicit`, else $SSM_LAB_EXPERIMENTS_DIR, else the repository's
  `experiments/` (the parent of the ssm_lab package)."""
  if explicit:
    return os.path.abspath(explicit)
  if os.environ.get(ENV_DIR):
    return os.path.abspath(os.environ[ENV_DIR])
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(package), "experiments")


def _load_module(path: str, name: str, register: bool = False) -> types.ModuleType:
  """Executes the file `path` as a new module `name` (kept in sys.modules under it with
  `register`, from before its code runs, as an import does)."""
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"cannot load {path}")
  module = importlib.util.module_from_spec(spec)
  if register:
    sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    if register:
      del sys.modules[name]
    raise
  return module


def load_file(path: str) -> types.ModuleType:
  """The Python file `path` as a module, executed once per process (kept in sys.modules under a
  name made from its absolute path). Study folders and benchmarks/ scripts are not packages; their
  parts import each other through this."""
  path = os.path.abspath(path)
  key = "ssm_lab_file_" + re.sub(r"\W", "_", path)
  if key not in sys.modules:
    _load_module(path, key, register=True)
  return sys.modules[key]


@dataclasses.dataclass
class Study:
  """A study folder: `sweep.py` (required), `plot.py` (optional), `README.md`, `results/`."""

  name: str
  path: str

  @property
  def results_dir(self) -> str:
    return os.path.join(self.path, "results")

  @property
  def readme(self) -> str:
    return os.path.join(self.path, "README.md")

  def sweep_module(self) -> types.ModuleType:
    return _load_module(os.path.join(self.path, "sweep.py"), f"ssm_lab_study_{self.name}_sweep")

  def plot_module(self) -> types.ModuleType | None:
    path = os.path.join(self.path, "plot.py")
    return _load_module(path, f"ssm_lab_study_{self.name}_plot") if os.path.exists(path) else None

  def runs(self, smoke: bool = False) -> list[Run]:
    """The sweep's runs, checked: each a `Run`, names unique."""
    module = self.sweep_module()
    if not callable(getattr(module, "runs", None)):
      raise AttributeError(f"{self.path}/sweep.py must define runs(smoke: bool = False) -> list[Run]")
    runs = list(module.runs(smoke=smoke))
    seen: set[str] = set()
    for run in runs:
      if not isinstance(run, Run):
        raise TypeError(f"{self.path}/sweep.py: runs() returned {type(run).__name__}, not Run")
      if run.name in seen:
        raise ValueError(f"{self.path}/sweep.py: run name {run.name!r} appears twice")
      seen.add(run.name)
    return runs

  def hook(self, name: str) -> Callable[..., Any] | None:
    """`name` (e.g. "plot", "table") from plot.py, else from sweep.py, else None."""
    for module in (self.plot_module(), self.sweep_module()):
      if module is not None and callable(getattr(module, name, None)):
        return getattr(module, name)
    return None


def find_studies(root: str | None = None) -> dict[str, Study]:
  """{name: Study} for every folder of `root` (see `experiments_dir`) that holds a sweep.py."""
  root = experiments_dir(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"experiments directory {root} not found (set --experiments_dir or "
                            f"${ENV_DIR})")
  return {d: Study(d, os.path.join(root, d)) for d in sorted(os.listdir(root))
          if os.path.isfile(os.path.join(root, d, "sweep.py"))}


def get_study(name: str, root: str | None = None) -> Study:
  studies = find_studies(root)
  if name not in studies:
    raise KeyError(f"no study {name!r} in {experiments_dir(root)}; studies: {sorted(studies)}")
  return studies[name]


# Helpers sweeps share.

def available_letters() -> set[str]:
  """Layer letters of every registered mixer (`ssm_lab.layers.registry`)."""
  from ssm_lab.layers import registry  # noqa: PLC0415

  return set(registry.letters())


def sweep_config(task: dict[str, Any], *, pattern: str, d_model: int, batch_size: int,
                 num_steps: int, learning_rate: float, block_mlp: bool = False,
                 mixers: dict[str, dict[str, Any]] | None = None, warmup_steps: int | None = None,
                 constant_lr: bool = False, segments: int = 1) -> ml_collections.ConfigDict:
  """One study run's config: `ssm_lab.config.base_config()` with `task`, the model (`pattern`,
  `d_model`, mixer group fields), and a quiet schedule evaluated and checkpointed `segments` times
  (the runner's early-stop checks) keeping one checkpoint.

  Warmup defaults to a tenth of the steps (at most 100); `constant_lr` holds the rate with no warmup
  and no decay. Mamba-2 blocks get head_dim min(64, 2 * d_model) unless `mixers` sets it.
  """
  from ssm_lab.config import base_config  # noqa: PLC0415

  config = base_config()
  config.task = ml_collections.ConfigDict(task)
  m = config.model
  m.pattern, m.d_model, m.block_mlp = pattern, d_model, block_mlp
  if (letter_of("mamba2") or "?") in pattern and "head_dim" not in (mixers or {}).get("mamba2", {}):
    set_mixer(config, "mamba2", head_dim=min(64, 2 * d_model))
  for group, fields in (mixers or {}).items():
    set_mixer(config, group, **fields)
  t = config.train
  t.batch_size, t.num_steps, t.learning_rate = batch_size, num_steps, learning_rate
  if constant_lr:
    t.warmup_steps, t.min_lr_ratio = 0, 1.0
  else:
    t.warmup_steps = min(100, num_steps // 10) if warmup_steps is None else warmup_steps
  t.eval_every = max(1, num_steps // segments)
  t.checkpoint_every = t.eval_every
  t.keep_checkpoints = 1
  t.log_every = min(100, num_steps)
  t.progress_bar = False
  return config


def set_mixer(config: ml_collections.ConfigDict, group: str, **fields: Any) -> None:
  """Sets fields of a mixer's config group, e.g. `set_mixer(cfg, "mamba2", d_state=64)`; a group or
  field the schema does not have raises KeyError naming it."""
  model = config.model
  if group not in model or not isinstance(model[group], ml_collections.ConfigDict):
    groups = sorted(k for k in model if isinstance(model[k], ml_collections.ConfigDict))
    raise KeyError(f"config.model has no mixer group {group!r}; groups: {groups}")
  for key, value in fields.items():
    if key not in model[group]:
      raise KeyError(f"config.model.{group} has no field {key!r}; fields: {sorted(model[group])}")
    model[group][key] = value


def letter_of(group: str) -> str | None:
  """The pattern letter of the registered mixer whose config group is `group` (e.g. "s4d"), or None
  while no such mixer is registered, so sweeps can name mixers that are still being added."""
  from ssm_lab.layers import registry  # noqa: PLC0415

  return next((spec.letter for spec in registry.specs() if spec.name == group), None)


def is_out_of_memory(err: BaseException) -> bool:
  """Whether `err` says the device or host ran out of memory (XLA's RESOURCE_EXHAUSTED, a failed
  allocation, MemoryError): an evaluation that hits it records the limit instead of failing."""
  if isinstance(err, MemoryError):
    return True
  text = str(err)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "Failed to allocate", "failed to allocate"))


def scored_accuracy(run: Any, batches: Any) -> dict[str, float]:
  """Accuracy of a loaded run (`ssm_lab.runs.load_run`) on language-modelling batches
  ({"inputs", "targets", "loss_mask"}, each [batch, length]): "accuracy" over the scored positions
  (loss_mask > 0, as the training loop's eval counts them), "last_position_accuracy" at each row's
  last scored position, and "count" (scored positions seen)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  predict = jax.jit(lambda params, x: jnp.argmax(
      run.model.apply({"params": params}, x), axis=-1).astype(jnp.int32))
  correct = count = last_correct = rows = 0.0
  for batch in batches:
    pred = np.asarray(predict(run.params, jnp.asarray(batch["inputs"])))
    hit = (pred == batch["targets"]).astype(np.float64)
    mask = batch["loss_mask"] > 0
    correct += float((hit * mask).sum())
    count += float(mask.sum())
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)   # each row's last scored position
    scored = mask.any(axis=1)
    last_correct += float(hit[np.arange(len(hit)), last][scored].sum())
    rows += float(scored.sum())
  if not count:
    raise ValueError("scored_accuracy: the batches hold no scored position (loss_mask is all zero)")
  return {"accuracy": correct / count, "last_position_accuracy": last_correct / rows, "count": count}
