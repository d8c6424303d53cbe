"""Runs a study's sweep through the one training loop, one result file per run, resumable.

Runs with an "ok" result are skipped; failures are recorded as results and retried on the next call;
a budget stops starting new runs. So a sweep larger than one device session is the same command
repeated until `python -m ssm_lab.experiments list` shows it done.

With `vmap` on, the training runs of a `sweep_groups` group (configs equal but for the learning rate
and the seed) train as one vmapped population (`train.train_and_evaluate_many`, the same loop); each
still gets its own workdir and result file (with "population": the group's size). A group whose
members cannot train together (checkpoints at different steps, FSDP) trains one by one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
import time
import traceback
from typing import Any, Callable, Sequence

import ml_collections

from ssm_lab.experiments import results as results_lib
from ssm_lab.experiments.study import Run, Study

DEFAULT_OUT = "runs/experiments"


@dataclasses.dataclass
class Paths:
  """Where a study's workdirs and result files go; smoke sweeps never write into the repository."""

  workdirs: str
  results: str

  @classmethod
  def for_study(cls, study: Study, *, smoke: bool, out: str | None = None,
                results_dir: str | None = None) -> Paths:
    out = out or DEFAULT_OUT
    base = os.path.join(out, "smoke", study.name) if smoke else os.path.join(out, study.name)
    default_results = os.path.join(base, "results") if smoke else study.results_dir
    return cls(workdirs=base, results=results_dir or default_results)


def select(runs: Sequence[Run], only: str | None) -> list[Run]:
  """The runs whose name matches `only`: comma-separated globs (`L64-*,L128-d64-*`), or a regular
  expression after `re:` (searched in the name). Patterns may carry a `<study>/` prefix."""
  if not only:
    return list(runs)
  if only.startswith("re:"):
    regex = re.compile(only[3:])
    return [r for r in runs if regex.search(r.name)]
  patterns = [p.strip().split("/", 1)[-1] for p in only.split(",") if p.strip()]
  return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]


def sweep_groups(runs: Sequence[Run], over: Sequence[str] = ("train.learning_rate", "seed")
                 ) -> list[list[Run]]:
  """Training runs grouped by everything but the config fields `over` (the runs a population may
  train together), in the order of each group's first run; measurement runs are groups of one."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    if run.config is None:
      groups.setdefault(f"fn:{run.name}", []).append(run)
      continue
    cfg = json.loads(run.config.to_json_best_effort())
    for path in over:
      node = cfg
      *parents, leaf = path.split(".")
      for p in parents:
        node = node.get(p, {})
      node.pop(leaf, None)
    groups.setdefault(json.dumps(cfg, sort_keys=True), []).append(run)
  return list(groups.values())


class Interrupted(RuntimeError):
  """Training returned before its last step (SIGTERM): the sweep stops starting runs."""


def _latest_step(workdir: str) -> int:
  ckpts = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  return max(steps, default=0)


def _last_eval(workdir: str) -> dict[str, float]:
  """The last evaluation's scalars from the workdir's TensorBoard events (for a run that was already
  complete, where `train_and_evaluate` returns without evaluating)."""
  from ssm_lab.metrics import read_scalars  # noqa: PLC0415

  logdir = os.path.join(workdir, "eval")
  if not os.path.isdir(logdir):
    return {}
  scalars = read_scalars(logdir)
  last = max((s[-1][0] for s in scalars.values() if s), default=None)
  return {tag: v for tag, s in scalars.items() for step, v in s if step == last}


def _check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != json.loads(config.to_json_best_effort()):
      raise ValueError(f"{path} holds another config than this run's (the sweep changed since it "
                       f"trained); delete {workdir} to retrain, or give the run a new name")


def _finish(run: Run, workdir: str, metrics: dict[str, Any], step: int,
            stopped_early: bool) -> tuple[dict[str, Any], dict[str, Any]]:
  """A trained run's (metrics, training info), after `run.evaluate`; Interrupted when it stopped
  before its last step without reaching its early-stop threshold."""
  num_steps = run.config.train.num_steps
  if step < num_steps and not stopped_early:
    raise Interrupted(f"training of {run.name!r} stopped at step {step} of {num_steps} "
                      f"(preempted?); rerun to resume from its checkpoint")
  metrics = metrics or _last_eval(workdir)
  if run.evaluate is not None:
    metrics.update(run.evaluate(workdir, run.config))
  return metrics, {"steps": step, "num_steps": num_steps, "stopped_early": stopped_early}


def _reached(run: Run, metrics: dict[str, Any]) -> bool:
  key, threshold = run.early_stop
  if key not in metrics:
    raise KeyError(f"Run.early_stop metric {key!r} is not among the eval metrics "
                   f"{sorted(metrics)} of run {run.name!r}")
  return metrics[key] >= threshold


def train_group(runs: Sequence[Run], workdirs: Sequence[str]) -> list[Any]:
  """Trains runs whose configs differ only in learning rate and seed as one population; per run,
  (metrics, training info) or the exception that failed it.

  Early stopping stays per run: with any `early_stop` in the group, the population trains in
  segments of `eval_every` steps (one `train_and_evaluate_many` call each) and a run that reached
  its threshold leaves it, as its single run would have stopped. Raises train.PopulationError when
  the runs cannot train together (the caller trains them one by one).
  """
  from ssm_lab.train import train_and_evaluate_many  # noqa: PLC0415

  for run, workdir in zip(runs, workdirs, strict=True):
    _check_workdir(workdir, run.config)
  num_steps = runs[0].config.train.num_steps
  every = runs[0].config.train.eval_every
  segmented = any(r.early_stop is not None for r in runs)
  done: dict[int, Any] = {}
  active = list(range(len(runs)))
  step = _latest_step(workdirs[0])
  while active:
    target = min((step // every + 1) * every, num_steps) if segmented else None
    outcomes = train_and_evaluate_many([runs[i].config for i in active],
                                       [workdirs[i] for i in active], stop_at=target)
    still = []
    for i, outcome in zip(active, outcomes, strict=True):
      if isinstance(outcome, Exception):
        done[i] = outcome
        continue
      metrics = dict(outcome) or _last_eval(workdirs[i])
      at = _latest_step(workdirs[i])
      try:
        stop = at < (target or num_steps) or at >= num_steps or (
            runs[i].early_stop is not None and _reached(runs[i], metrics))
        if stop:
          done[i] = _finish(runs[i], workdirs[i], metrics, at, at < num_steps)
        else:
          still.append(i)
      except Exception as err:  # a missing metric or a failing `evaluate`: this run's result
        done[i] = err
    active, step = still, target or num_steps
  return [done[i] for i in range(len(runs))]


def train_run(run: Run, workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains `run.config` in `workdir` (resuming), then `run.evaluate`; (metrics, training info)."""
  from ssm_lab.train import train_and_evaluate  # noqa: PLC0415

  config = run.config
  _check_workdir(workdir, config)
  num_steps = config.train.num_steps
  stopped_early = False
  if run.early_stop is None:
    metrics = dict(train_and_evaluate(config, workdir))
    step = _latest_step(workdir)
  else:
    every = config.train.eval_every
    step = _latest_step(workdir)
    while True:
      target = min((step // every + 1) * every, num_steps)
      metrics = dict(train_and_evaluate(config, workdir, stop_at=target)) or _last_eval(workdir)
      step = _latest_step(workdir)
      if step < target:
        break
      if _reached(run, metrics) or step >= num_steps:
        stopped_early = step < num_steps
        break
  return _finish(run, workdir, metrics, step, stopped_early)


def _record(run: Run, study: Study, paths: Paths) -> dict[str, Any]:
  workdir = os.path.join(paths.workdirs, run.name)
  return {
      "name": run.name, "study": study.name, "status": "ok", "error": None, "tags": run.tags,
      "config": json.loads(run.config.to_json_best_effort()) if run.config is not None else None,
      "metrics": {}, "train": None, "wall_s": None,
      "workdir": workdir if run.config is not None else None,
  }


def _failed(record: dict[str, Any], err: BaseException) -> None:
  record["status"] = "failed"
  record["error"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
  lines = "".join(traceback.format_exception(err)).splitlines(keepends=True)
  record["traceback"] = "".join(lines[-30:])
  record["interrupted"] = isinstance(err, Interrupted)


def _stamp(record: dict[str, Any]) -> None:
  record.update(device=results_lib.device_info(), date=results_lib.utc_now(),
                commit=results_lib.git_commit(), versions=results_lib.versions())


def execute(run: Run, study: Study, paths: Paths) -> dict[str, Any]:
  """Runs one unit and returns its result record ("ok", or "failed" with the error)."""
  record = _record(run, study, paths)
  if run.config is not None:
    record["population"] = 1
  start = time.perf_counter()
  try:
    if run.config is not None:
      record["metrics"], record["train"] = train_run(run, record["workdir"])
    else:
      record["metrics"] = dict(run.fn())
  except Exception as err:  # a run's failure is a result; the sweep goes on (Interrupted stops it)
    _failed(record, err)
  record["wall_s"] = round(time.perf_counter() - start, 3)
  _stamp(record)
  return record


def execute_group(runs: Sequence[Run], study: Study, paths: Paths,
                  say: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Trains a sweep group as one population and returns a result record per run (each run's
  wall_s is its share of the group's; population_wall_s the whole). Falls back to one by one when
  the group cannot train as one program."""
  from ssm_lab.train import PopulationError  # noqa: PLC0415

  records = [_record(run, study, paths) for run in runs]
  start = time.perf_counter()
  try:
    outcomes = train_group(runs, [r["workdir"] for r in records])
  except PopulationError as err:
    say(f"training {len(runs)} runs one by one: {err}")
    return [execute(run, study, paths) for run in runs]
  except Exception as err:  # the population as a whole failed: so did each of its runs
    outcomes = [err] * len(runs)
  wall = time.perf_counter() - start
  for record, outcome in zip(records, outcomes, strict=True):
    if isinstance(outcome, BaseException):
      _failed(record, outcome)
    else:
      record["metrics"], record["train"] = outcome
    record.update(population=len(runs), wall_s=round(wall / len(runs), 3),
                  population_wall_s=round(wall, 3))
    _stamp(record)
  return records


def vmap_default() -> bool:
  """`--vmap auto`: populations on accelerators (where one small model leaves the device idle), one
  by one on CPU (where a population is no faster: benchmarks/results/population_cpu.md)."""
  import jax  # noqa: PLC0415

  return jax.default_backend() != "cpu"


def _clock(seconds: float) -> str:
  seconds = max(0.0, seconds)
  if seconds < 60:
    return f"{seconds:.0f}s"
  m, s = divmod(int(round(seconds)), 60)
  return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m{s:02d}s"


def run_study(study: Study, *, smoke: bool = False, only: str | None = None,
              budget_s: float | None = None, out: str | None = None, results_dir: str | None = None,
              dry_run: bool = False, retry_failed: bool = True, vmap: bool | str = False,
              say: Callable[[str], None] = print) -> dict[str, list[str]]:
  """Runs the pending runs of `study` (no "ok" result yet) in sweep order.

  `budget_s`: no run starts once `budget_s` seconds have passed, nor when the mean wall time of the
  runs so far says it would end past the budget (the ones left are listed). `vmap` (True, False or
  "auto": `vmap_default()`): train each `sweep_groups` group of pending runs as one population, the
  groups in the order of their first runs. Returns the names {"ok", "failed", "skipped",
  "remaining"} of this call.
  """
  paths = Paths.for_study(study, smoke=smoke, out=out, results_dir=results_dir)
  runs = select(study.runs(smoke=smoke), only)
  pending, skipped, previous = [], [], {}
  for run in runs:
    old = results_lib.read_result(paths.results, run.name)
    if old is not None and (old.get("status") == "ok" or not retry_failed):
      skipped.append(run.name)
    else:
      pending.append(run)
      previous[run.name] = old
  summary: dict[str, list[str]] = {"ok": [], "failed": [], "skipped": skipped, "remaining": []}
  label = f"{study.name}{' (smoke)' if smoke else ''}"
  say(f"{label}: {len(runs)} runs selected, {len(skipped)} have results, {len(pending)} to run; "
      f"results in {paths.results}")
  if dry_run:
    for i, run in enumerate(pending, 1):
      note = " (retry: failed before)" if previous[run.name] else ""
      say(f"[{i}/{len(pending)}] {run.name}{note}")
    summary["remaining"] = [r.name for r in pending]
    return summary
  groups = sweep_groups(pending)
  if vmap == "auto":  # asks the backend only when a population could form (measurement-only
    vmap = any(len(g) > 1 for g in groups) and vmap_default()  # sweeps leave the device alone)
  units = groups if vmap else [[run] for run in pending]
  order = [run for unit in units for run in unit]
  t0 = time.perf_counter()
  walls: list[float] = []
  i = 0  # runs started so far
  for unit in units:
    elapsed = time.perf_counter() - t0
    mean = sum(walls) / len(walls) if walls else 0.0
    if budget_s is not None and (elapsed >= budget_s or (walls and elapsed + mean * len(unit)
                                                         > budget_s)):
      summary["remaining"] = [r.name for r in order[i:]]
      say(f"budget of {budget_s:g} s: stopping after {_clock(elapsed)} with "
          f"{len(summary['remaining'])} runs left: " + ", ".join(summary["remaining"]))
      break
    for j, run in enumerate(unit, i + 1):
      old = previous[run.name]
      note = f" (retry; failed before: {old.get('error')})" if old else ""
      together = f" (a population of {len(unit)})" if len(unit) > 1 else ""
      say(f"[{j}/{len(pending)}] {run.name}: starting{together}{note}")
    if len(unit) > 1:
      records = execute_group(unit, study, paths, say=say)
    else:
      records = [execute(unit[0], study, paths)]
    interrupted = False
    for record in records:
      i += 1
      results_lib.write_result(paths.results, record)
      walls.append(record["wall_s"])
      elapsed = time.perf_counter() - t0
      eta = sum(walls) / len(walls) * (len(pending) - i)
      outcome = ("done" if record["status"] == "ok" else f"FAILED ({record['error']})")
      shown = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items()
                        if isinstance(v, (int, float)) and math.isfinite(v))
      say(f"[{i}/{len(pending)}] {record['name']} {outcome} in {record['wall_s']:.1f} s"
          f"{' (' + shown + ')' if shown else ''} (elapsed {_clock(elapsed)}, ETA {_clock(eta)})")
      summary[record["status"]].append(record["name"])
      interrupted = interrupted or bool(record.get("interrupted"))
    if interrupted:
      summary["remaining"] = [r.name for r in order[i:]]
      say(f"interrupted: stopping with {len(summary['remaining']) + 1} runs left")
      break
  say(f"{label}: {len(summary['ok'])} ok, {len(summary['failed'])} failed, "
      f"{len(summary['skipped'])} skipped, {len(summary['remaining'])} left")
  return summary


def status(study: Study, *, smoke: bool = False, out: str | None = None,
           results_dir: str | None = None) -> dict[str, int]:
  """{"runs", "done", "failed"} of a study's sweep against its results folder."""
  paths = Paths.for_study(study, smoke=smoke, out=out, results_dir=results_dir)
  names = [r.name for r in study.runs(smoke=smoke)]
  states = [(results_lib.read_result(paths.results, n) or {}).get("status") for n in names]
  return {"runs": len(names), "done": states.count("ok"), "failed": states.count("failed")}
