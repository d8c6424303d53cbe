"""Populations: runs differing only in learning rate and seed trained as one vmapped program through
the training loop (`train.train_and_evaluate_many`) and through the study runner (`--vmap`)."""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import jax
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab import train
from ssm_lab.metrics import read_scalars
from lm_helpers import latest_state, tiny_lm_config


def tiny_config(lr=1e-2, seed=0, steps=6, **train_kw):
  return tiny_lm_config("MA", steps, seed, **{"learning_rate": lr, "log_every": 1, "eval_every": 3,
                                              "checkpoint_every": 3, **train_kw})



def losses(workdir):
  return dict(read_scalars(os.path.join(workdir, "train"))["loss"])


def assert_same_run(got, want, rtol=1e-5):
  """Two workdirs trained the same config: same logged losses, eval metrics, final parameters."""
  lw, lg = losses(want), losses(got)
  assert sorted(lw) == sorted(lg)
  for step in lw:
    assert lg[step] == pytest.approx(lw[step], rel=rtol), step
  ew = {k: v[-1] for k, v in read_scalars(os.path.join(want, "eval")).items()}
  eg = {k: v[-1] for k, v in read_scalars(os.path.join(got, "eval")).items()}
  assert ew.keys() == eg.keys()
  for k in ew:
    assert eg[k][0] == ew[k][0] and eg[k][1] == pytest.approx(ew[k][1], rel=rtol, abs=1e-6), k
  (sw, pw), (sg, pg) = latest_state(want), latest_state(got)
  assert sw == sg
  for a, b in zip(jax.tree.leaves(pw), jax.tree.leaves(pg), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


CONFIGS = [tiny_config(lr=1e-2, seed=0), tiny_config(lr=3e-3, seed=1)]


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
  """The two members trained one by one, as `train_and_evaluate` does today."""
  root = tmp_path_factory.mktemp("singles")
  dirs = [str(root / f"m{i}") for i in range(len(CONFIGS))]
  metrics = [train.train_and_evaluate(c, d) for c, d in zip(CONFIGS, dirs, strict=True)]
  return dirs, metrics


def test_population_resumed_after_stop_at_equals_single_runs(tmp_path, singles):
  """A population of two learning rates and seeds, stopped at step 3 and resumed, logs the losses and
  eval metrics of the two single runs and ends with their parameters (up to float rounding); a
  member's step-3 checkpoint is an ordinary single run's checkpoint that `train_and_evaluate`
  resumes alone."""
  single_dirs, single_metrics = singles
  dirs = [str(tmp_path / f"p{i}") for i in range(len(CONFIGS))]
  first = train.train_and_evaluate_many(CONFIGS, dirs, stop_at=3)
  assert [latest_state(d)[0] for d in dirs] == [3, 3]
  assert all(isinstance(m, dict) and "accuracy" in m for m in first)
  alone = str(tmp_path / "alone")
  shutil.copytree(dirs[1], alone)
  metrics = train.train_and_evaluate_many(CONFIGS, dirs)
  for got, want, m, w in zip(dirs, single_dirs, metrics, single_metrics, strict=True):
    assert_same_run(got, want)
    assert m.keys() == w.keys() and all(m[k] == pytest.approx(w[k], rel=1e-5) for k in w)
    with open(os.path.join(got, "config.json")) as f:
      assert json.load(f)["train"]["learning_rate"] in (1e-2, 3e-3)
  # The members differ: the comparison is not between two copies of one run.
  assert losses(dirs[0])[6] != pytest.approx(losses(dirs[1])[6], rel=1e-3)
  # Member 1's checkpoint, resumed as a single run.
  train.train_and_evaluate(CONFIGS[1], alone)
  assert_same_run(alone, single_dirs[1])


def test_members_stopped_between_their_saves_resume_together(tmp_path, singles):
  """A kill during a population's preemption save can leave one member ahead; the population then
  resumes all members at the newest step they share (the newer checkpoint moved aside, not lost)
  and still ends where the single runs end."""
  single_dirs, _ = singles
  dirs = [str(tmp_path / f"p{i}") for i in range(len(CONFIGS))]
  train.train_and_evaluate_many(CONFIGS, dirs, stop_at=3)
  train.train_and_evaluate(CONFIGS[0], dirs[0], stop_at=5)     # member 0 alone, two steps ahead
  assert [latest_state(d)[0] for d in dirs] == [5, 3]
  train.train_and_evaluate_many(CONFIGS, dirs)
  for got, want in zip(dirs, single_dirs, strict=True):
    assert_same_run(got, want)
  aside = os.listdir(os.path.join(dirs[0], "checkpoints_ahead"))
  assert [n.split("-")[0] for n in aside] == ["5"]


def test_a_diverging_member_is_frozen_while_the_other_finishes(tmp_path):
  configs = [tiny_config(lr=1e-2, steps=8, max_bad_steps=2, grad_clip_norm=1e30, warmup_steps=0),
             tiny_config(lr=1e30, steps=8, max_bad_steps=2, grad_clip_norm=1e30, warmup_steps=0)]
  dirs = [str(tmp_path / "ok"), str(tmp_path / "diverges")]
  ok, failed = train.train_and_evaluate_many(configs, dirs)
  assert isinstance(ok, dict) and np.isfinite(ok["loss"])
  assert isinstance(failed, FloatingPointError) and "2 consecutive steps" in str(failed)
  assert "learning_rate=1e+29" in str(failed)
  assert latest_state(dirs[0])[0] == 8
  steps = sorted(int(n) for n in os.listdir(os.path.join(dirs[1], "checkpoints")) if n.isdigit())
  assert not steps, steps  # the diverged member never wrote its state
  assert max(losses(dirs[0])) == 8 and max(losses(dirs[1]), default=0) < 8
  # Members now at different steps do not train as one program again.
  with pytest.raises(train.PopulationError, match="different steps"):
    train.train_and_evaluate_many(
        [configs[0], tiny_config(lr=1e-3, steps=8, max_bad_steps=2, grad_clip_norm=1e30,
                                 warmup_steps=0)], dirs)


@pytest.mark.parametrize("mutate,field", [
    (lambda c: setattr(c.train, "batch_size", 16), "config.train.batch_size"),
    (lambda c: setattr(c.model, "d_model", 16), "config.model.d_model"),
    (lambda c: setattr(c.task, "seed", 3), "config.task.seed"),
])
def test_members_may_differ_only_in_learning_rate_and_seed(tmp_path, mutate, field):
  other = tiny_config(lr=1e-3, seed=5)
  mutate(other)
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    train.train_and_evaluate_many([tiny_config(), other], [str(tmp_path / "a"), str(tmp_path / "b")])
  assert not os.path.exists(tmp_path / "a")


def test_fsdp_populations_are_refused(tmp_path):
  configs = [tiny_config(parallelism="fsdp"), tiny_config(lr=1e-3, parallelism="fsdp")]
  with pytest.raises(train.PopulationError, match="fsdp"):
    train.train_and_evaluate_many(configs, [str(tmp_path / "a"), str(tmp_path / "b")])


SWEEP = '''
"""Population toy study: two learning rates of one config, plus an early-stopping pair."""
from lm_helpers import tiny_study_config as tiny

from ssm_lab.experiments import Run




def extra(workdir, config):
  return {"extra": float(config.train.learning_rate)}


def runs(smoke=False):
  out = [Run(name=f"lr{lr:g}", config=tiny(lr, seed=i), evaluate=extra, tags={"lr": lr})
         for i, lr in enumerate((1e-2, 3e-3))]
  # Early stop per run: "es-stop" stops at its first evaluation (step 2), "es-go" trains on to 6.
  out += [Run(name=f"es-{name}", config=tiny(lr, steps=6, eval_every=2), tags={"lr": lr},
              early_stop=("accuracy", threshold))
          for name, lr, threshold in (("stop", 1e-2, -1.0), ("go", 3e-3, 2.0))]
  return out


def table(results):
  return ""
'''


def test_runner_trains_sweep_groups_as_populations(tmp_path, monkeypatch):
  from ssm_lab.experiments import __main__ as cli  # noqa: PLC0415

  root = tmp_path / "experiments"
  (root / "pop").mkdir(parents=True)
  (root / "pop" / "sweep.py").write_text(textwrap.dedent(SWEEP))
  (root / "pop" / "README.md").write_text("# Pop\n")
  monkeypatch.setenv("SSM_LAB_EXPERIMENTS_DIR", str(root))
  res_on, res_off = str(tmp_path / "res_on"), str(tmp_path / "res_off")
  assert cli.main(["run", "pop", "--vmap", "on", "--out", str(tmp_path / "on"),
                   "--results_dir", res_on]) == 0
  records = {n: json.load(open(os.path.join(res_on, f"{n}.json")))
             for n in ("lr0.01", "lr0.003", "es-stop", "es-go")}
  assert all(r["status"] == "ok" and r["population"] == 2 for r in records.values()), records
  assert records["lr0.003"]["metrics"]["extra"] == 3e-3
  assert records["es-stop"]["train"] == {"steps": 2, "num_steps": 6, "stopped_early": True}
  assert records["es-go"]["train"] == {"steps": 6, "num_steps": 6, "stopped_early": False}
  # The same runs one by one give the same metrics.
  assert cli.main(["run", "pop", "--vmap", "off", "--only", "lr*", "--out", str(tmp_path / "off"),
                   "--results_dir", res_off]) == 0
  for name in ("lr0.01", "lr0.003"):
    alone = json.load(open(os.path.join(res_off, f"{name}.json")))
    assert alone["population"] == 1
    for k, v in alone["metrics"].items():
      assert records[name]["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, k)
