"""The study runner end to end on a toy study: results, skipping, failures, selection, budget, plots,
README tables and the CLI."""

from __future__ import annotations

import json
import os

import pytest

from ssm_lab import experiments
from ssm_lab.experiments import __main__ as cli
from ssm_lab.experiments import runner


def names(results_dir):
  return sorted(f[:-5] for f in os.listdir(results_dir) if f.endswith(".json"))


def test_measurements_skip_on_rerun_and_failures_are_results_and_retried(toy, tmp_path):
  root, state = toy
  study = experiments.get_study("toy")
  out, res = str(tmp_path / "out"), str(tmp_path / "res")
  lines = []
  summary = experiments.run_study(study, out=out, results_dir=res, say=lines.append)
  assert summary["ok"] == ["m1", "m2", "m3"] and summary["failed"] == ["flaky"]
  assert names(res) == ["flaky", "m1", "m2", "m3"]
  record = json.load(open(os.path.join(res, "m2.json")))
  assert record["status"] == "ok" and record["metrics"] == {"value": 4.0}
  assert record["tags"] == {"kind": "m", "x": 2} and record["config"] is None
  assert record["wall_s"] >= 0.0   # an instant measurement rounds to 0.0 s
  for key in ("device", "date", "commit", "versions"):
    assert record[key], key
  assert record["device"]["backend"] == "cpu" and "jax" in record["versions"]
  failed = json.load(open(os.path.join(res, "flaky.json")))
  assert failed["status"] == "failed"
  assert failed["error"] == "RuntimeError: flaky measurement broke"
  assert "Traceback" in failed["traceback"]
  assert any(line.startswith("[2/4] m2 done in") and "ETA" in line for line in lines), lines
  assert not [f for f in os.listdir(res) if f.startswith(".")]  # no temporary files left

  # Rerun: the ok ones are skipped, the failed one is retried (and says so).
  (state / "fixed").touch()
  lines.clear()
  summary = experiments.run_study(study, out=out, results_dir=res, say=lines.append)
  assert summary["skipped"] == ["m1", "m2", "m3"] and summary["ok"] == ["flaky"]
  assert any("retry; failed before: RuntimeError" in line for line in lines), lines
  assert json.load(open(os.path.join(res, "flaky.json")))["status"] == "ok"
  assert experiments.status(study, results_dir=res) == {"runs": 4, "done": 4, "failed": 0}


def test_only_budget_and_dry_run(toy, tmp_path, monkeypatch):
  study = experiments.get_study("toy")
  runs = study.runs()
  assert [r.name for r in experiments.select(runs, "m*")] == ["m1", "m2", "m3"]
  assert [r.name for r in experiments.select(runs, "toy/m1, flaky")] == ["m1", "flaky"]
  assert [r.name for r in experiments.select(runs, "re:^m[23]$")] == ["m2", "m3"]
  res = str(tmp_path / "res")
  summary = experiments.run_study(study, results_dir=res, dry_run=True, say=lambda s: None)
  assert summary["remaining"] == ["m1", "m2", "m3", "flaky"] and not os.path.exists(res)
  summary = experiments.run_study(study, results_dir=res, budget_s=0, say=lambda s: None)
  assert summary["remaining"] == ["m1", "m2", "m3", "flaky"] and not os.path.exists(res)
  # Each run takes 0.3 s: after the first, a second would end past a 0.5 s budget.
  monkeypatch.setenv("TOY_SLEEP", "0.3")
  lines = []
  summary = experiments.run_study(study, only="m*", results_dir=res, budget_s=0.5, say=lines.append)
  assert summary["ok"] == ["m1"] and summary["remaining"] == ["m2", "m3"]
  assert any(line.startswith("budget of 0.5 s") and "m2, m3" in line for line in lines), lines


def test_training_runs_record_config_metrics_evaluate_and_early_stop(toy, tmp_path):
  study = experiments.get_study("toy")
  out, res = str(tmp_path / "out"), str(tmp_path / "res")
  summary = experiments.run_study(study, smoke=True, only="train-*", out=out, results_dir=res)
  assert summary["ok"] == ["train-lr1e-2", "train-early"], summary
  record = json.load(open(os.path.join(res, "train-lr1e-2.json")))
  assert record["config"]["train"]["num_steps"] == 4 and record["config"]["model"]["pattern"] == "A"
  assert 0.0 <= record["metrics"]["accuracy"] <= 1.0 and record["metrics"]["extra"] == 1e-2
  assert record["train"] == {"steps": 4, "num_steps": 4, "stopped_early": False}
  assert record["workdir"] == os.path.join(out, "smoke", "toy", "train-lr1e-2")
  assert os.path.exists(os.path.join(record["workdir"], "config.json"))
  early = json.load(open(os.path.join(res, "train-early.json")))
  assert early["train"] == {"steps": 2, "num_steps": 6, "stopped_early": True}

  # A workdir that trained another config is not silently resumed.
  os.remove(os.path.join(res, "train-lr1e-2.json"))
  config_path = os.path.join(record["workdir"], "config.json")
  saved = json.load(open(config_path))
  saved["train"]["learning_rate"] = 0.5
  json.dump(saved, open(config_path, "w"))
  summary = experiments.run_study(study, smoke=True, only="train-*", out=out, results_dir=res,
                                  say=lambda s: None)
  assert summary["failed"] == ["train-lr1e-2"] and summary["skipped"] == ["train-early"]
  error = json.load(open(os.path.join(res, "train-lr1e-2.json")))["error"]
  assert "holds another config" in error and "train-lr1e-2" in error


def test_interrupted_training_is_a_failure_and_stops_the_sweep(toy, tmp_path, monkeypatch):
  import ssm_lab.train
  monkeypatch.setattr(ssm_lab.train, "train_and_evaluate", lambda config, workdir, **kw: {})
  study = experiments.get_study("toy")
  res = str(tmp_path / "res")
  summary = experiments.run_study(study, smoke=True, only="train-*", out=str(tmp_path / "out"),
                                  results_dir=res, say=lambda s: None)
  assert summary["failed"] == ["train-lr1e-2"] and summary["remaining"] == ["train-early"]
  record = json.load(open(os.path.join(res, "train-lr1e-2.json")))
  assert record["interrupted"] and "stopped at step 0 of 4" in record["error"]


def test_plot_and_table_rebuild_from_results(toy, tmp_path):
  root, state = toy
  (state / "fixed").touch()
  study = experiments.get_study("toy")
  res = str(tmp_path / "res")
  experiments.run_study(study, results_dir=res, say=lambda s: None)
  paths = experiments.plot_study(study, res, str(tmp_path / "plots"))
  assert paths == [str(tmp_path / "plots" / "toy.png")]
  assert open(paths[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  readme = tmp_path / "README.md"
  readme.write_text((root / "toy" / "README.md").read_text())
  table = experiments.table_study(study, res, str(readme))
  text = readme.read_text()
  assert "(old table)" not in text and table in text and text.endswith("Verdict.\n")
  assert "| kind | x=0 | x=1 | x=2 | x=3 |" in table and "| m | – | 2 | 4 | 6 |" in table


def test_cli_list_run_table(toy, tmp_path, capsys, monkeypatch):
  root, state = toy
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))  # keep jax.config as is
  res = str(tmp_path / "res")
  assert cli.main(["run", "toy", "--only", "m*", "--results_dir", res, "--out",
                   str(tmp_path / "out")]) == 0
  assert cli.main(["run", "toy", "--only", "flaky", "--results_dir", res]) == 1  # a run failed
  assert cli.main(["list", "--results_dir", res]) == 0
  out = capsys.readouterr().out
  assert "[3/3] m3 done in" in out
  assert "toy" in out and "4 runs" in out and "3 done" in out and "1 failed" in out
  assert cli.main(["table", "toy", "--results_dir", res, "--print_only"]) == 0
  assert "| m |" in capsys.readouterr().out
  assert "(old table)" in (root / "toy" / "README.md").read_text()  # --print_only wrote nothing


def test_sweep_groups_leave_out_learning_rate_and_seed(toy):
  study = experiments.get_study("toy")
  runs = study.runs(smoke=True)
  groups = runner.sweep_groups(runs)
  train_groups = [[r.name for r in g] for g in groups if g[0].config is not None]
  assert train_groups == [["train-lr1e-2"], ["train-early"]]  # they differ in steps, not only lr
  a, b = study.runs(smoke=True)[4], study.runs(smoke=True)[4]
  b.config.train.learning_rate = 3e-3
  assert len(runner.sweep_groups([a, b])) == 1


def test_a_study_with_duplicate_names_or_bad_runs_is_refused(tmp_path):
  with pytest.raises(ValueError, match="exactly one of Run.config"):
    experiments.Run(name="x")
  with pytest.raises(ValueError, match="Run.name"):
    experiments.Run(name="a/b", fn=dict)
  (tmp_path / "dup").mkdir()
  (tmp_path / "dup" / "sweep.py").write_text(
      "from ssm_lab.experiments import Run\n"
      "def runs(smoke=False):\n  return [Run(name='a', fn=dict), Run(name='a', fn=dict)]\n")
  with pytest.raises(ValueError, match="'a' appears twice"):
    experiments.get_study("dup", str(tmp_path)).runs()
  with pytest.raises(KeyError, match="no study 'nope'"):
    experiments.get_study("nope", str(tmp_path))
