"""The state_tracking study (Merrill et al. 2024): the sweep's shape, and its smoke sweep end to end
on CPU (the depth search training deeper models in sub-workdirs, results, plot, README table)."""

from __future__ import annotations

import os
import shutil

from ssm_lab import config as config_lib
from ssm_lab import experiments
from ssm_lab.experiments import results as results_lib
from ssm_lab.experiments.study import letter_of

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


def study():
  return experiments.get_study("state_tracking", EXPERIMENTS)


def test_sweep_covers_groups_models_and_lengths():
  s = study()
  sweep = s.sweep_module()
  runs = s.runs()
  models = sweep.models()
  assert {"transformer", "mamba", "mamba2"} <= set(models)
  assert ("lstm" in models) == (letter_of("lstm") is not None)
  gpu = [r for r in runs if r.tags["setting"] == "gpu"]
  assert len(gpu) == 3 * len(models) * 5
  assert {r.tags["group"] for r in gpu} == {"S5", "A5", "Z60"}
  assert max(r.tags["seq_len"] for r in gpu) >= 64
  for run in runs:
    config_lib.validate(run.config)
    m = run.config.model
    assert len(m.pattern) == 1 and run.config.task.name == "word_problem"
    assert m.block_mlp == (run.tags["model"] == "transformer")
    assert run.tags["max_depth"] == (1 if run.tags["model"] == "lstm"
                                     else sweep.SETTINGS[run.tags["setting"]]["max_depth"])
    assert run.early_stop == ("accuracy", 0.9)
  deeper = sweep.with_depth(gpu[0].config, 5)
  assert deeper.model.pattern == gpu[0].config.model.pattern * 5 and len(gpu[0].config.model.pattern) == 1
  assert len(experiments.select(runs, "gpu-S5-*-mamba")) == 5


def test_smoke_sweep_end_to_end(tmp_path):
  s = study()
  res = str(tmp_path / "results")
  out = tmp_path / "out"
  summary = experiments.run_study(s, smoke=True, out=str(out), results_dir=res)
  assert not summary["failed"] and len(summary["ok"]) == len(s.runs(smoke=True))
  records = {r["name"]: r for r in results_lib.load_results(res)}
  tf = records["smoke-S5-L4-transformer"]["metrics"]
  # 4 steps reach no 90% on S5, so the search trained depth 2 in a sub-workdir and stopped at the cap.
  assert tf["min_depth"] is None and sorted(tf["accuracy_by_depth"]) == ["1", "2"]
  assert os.path.isdir(os.path.join(records["smoke-S5-L4-transformer"]["workdir"], "depth2"))
  assert all(0.0 <= v <= 1.0 for v in tf["last_position_accuracy_by_depth"].values())
  assert sorted(records["smoke-S5-L4-mamba"]["metrics"]["accuracy_by_depth"]) == ["1"]
  # A rerun of the search finds every depth trained and trains nothing more.
  again = s.sweep_module().depth_search(2)(records["smoke-S5-L4-transformer"]["workdir"],
                                           s.runs(smoke=True)[0].config)
  assert again["steps_by_depth"] == tf["steps_by_depth"]
  paths = experiments.plot_study(s, res, str(tmp_path / "plots"))
  assert [os.path.basename(p) for p in paths] == ["min_depth_vs_length_smoke.png"]
  readme = tmp_path / "README.md"
  shutil.copy(s.readme, readme)
  table = experiments.table_study(s, res, str(readme))
  assert "| group | model | seq_len=4 |" in table
  assert "| S5 | transformer | > 2 |" in table and "| S5 | mamba | > 1 |" in table
  assert table in readme.read_text()
