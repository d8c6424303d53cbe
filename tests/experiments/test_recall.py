"""The recall study (Zoology's MQAR gap): the full sweep's shape, and its smoke sweep end to end
(training, results, plot, README table) on CPU."""

from __future__ import annotations

import os
import shutil

from ssm_lab import config as config_lib
from ssm_lab import experiments
from ssm_lab.experiments import results as results_lib

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


def study():
  return experiments.get_study("recall", EXPERIMENTS)


def test_full_sweep_matches_the_paper_setting():
  s = study()
  every = s.runs()
  runs = [r for r in every if r.tags["setting"] == "full"]
  sweep = s.sweep_module()
  models = sweep.models()
  assert set(models) >= {"attention", "mamba", "mamba2_n64", "mamba2_n128", "hybrid"}
  assert ("hyena" in models) == ("H" in experiments.available_letters())
  assert len(runs) == 4 * 4 * len(models) * 4
  for run in runs:
    config_lib.validate(run.config)
    t, task, m = run.config.train, run.config.task, run.config.model
    assert task.vocab_size == 8192 and task.num_eval_examples == 3000 and len(m.pattern) == 2
    assert not m.block_mlp
    assert t.batch_size == {64: 512, 128: 512, 256: 256, 512: 128}[task.seq_len]
    assert t.num_steps * t.batch_size == 64 * 100_000
    assert run.name.startswith(f"L{task.seq_len}-d{m.d_model}-{run.tags['model']}-lr")
  lrs = sorted({r.tags["lr"] for r in runs})
  assert len(lrs) == 4 and abs(lrs[0] - 1e-4) < 1e-12 and abs(lrs[-1] - 1e-2) < 1e-12
  assert len(experiments.select(runs, "L64-*-mamba-*")) == 16
  cpu = [r for r in every if r.tags["setting"] == "cpu"]
  assert len(cpu) + len(runs) == len(every) and all(r.name.startswith("cpu-L") for r in cpu)
  assert experiments.select(every, "cpu-*") == cpu


def test_smoke_sweep_end_to_end(tmp_path):
  s = study()
  res = str(tmp_path / "results")
  summary = experiments.run_study(s, smoke=True, out=str(tmp_path / "out"), results_dir=res)
  assert not summary["failed"] and len(summary["ok"]) == len(s.runs(smoke=True))
  records = results_lib.load_results(res)
  assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in records)
  paths = experiments.plot_study(s, res, str(tmp_path / "plots"))
  assert [os.path.basename(p) for p in paths] == ["accuracy_vs_d_model.png"]
  readme = tmp_path / "README.md"
  shutil.copy(s.readme, readme)
  table = experiments.table_study(s, res, str(readme))
  assert "| setting | seq_len | model | d_model=16 |" in table
  assert "| smoke | 32 | attention |" in table
  assert table in readme.read_text()
