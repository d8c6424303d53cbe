"""The synthetics study (Mamba, section 4.1): the full sweep's shape against the paper's setting, the
out-of-memory stop of the length sweep, and the smoke sweep end to end (training, evaluation at other
lengths, results, plots, README table) on CPU."""

from __future__ import annotations

import os
import shutil

from ssm_lab import config as config_lib
from ssm_lab import experiments
from ssm_lab.experiments import results as results_lib
from ssm_lab.experiments.study import letter_of

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


def study():
  return experiments.get_study("synthetics", EXPERIMENTS)


def test_full_sweep_matches_the_paper_setting():
  s = study()
  sweep = s.sweep_module()
  runs = {r.name: r for r in s.runs()}
  copy = [r for r in runs.values() if r.tags["task"] == "copy" and "setting" not in r.tags]
  cpu_copy = [r for r in runs.values() if r.tags["task"] == "copy" and r.tags.get("setting") == "cpu"]
  induction = [r for r in runs.values() if r.tags["task"] == "induction"]
  assert {r.tags["model"] for r in copy} == set(sweep.copy_models())
  assert {"mamba_s6", "mamba2"} <= set(sweep.copy_models())
  assert ("s4d_nogate" in sweep.copy_models()) == (letter_of("s4d") is not None)
  assert ("h3_hyena" in sweep.copy_models()) == (letter_of("hyena") is not None)
  assert "s6_nogate" not in sweep.COPY_MODELS   # our Mamba mixer cannot drop its gate
  assert len(copy) == 2 * len(sweep.copy_models())
  for run in copy:
    config_lib.validate(run.config)
    task, m, t = run.config.task, run.config.model, run.config.train
    assert (task.seq_len, task.vocab_size, task.num_tokens) == (4096, 16, 16)
    assert (len(m.pattern), m.d_model, t.batch_size) == (2, 64, 64)
    assert t.warmup_steps == 0 and t.min_lr_ratio == 1.0   # constant learning rate
  assert abs(runs["copy-mamba_s6-lr1.0e-04"].config.train.learning_rate - 1e-4) < 1e-12
  # The CPU setting: the same task at length 256, one learning rate, the LTI rows against S6.
  assert {r.tags["model"] for r in cpu_copy} == set(sweep.CPU_COPY_MODELS) & set(sweep.copy_models())
  for run in cpu_copy:
    config_lib.validate(run.config)
    task, t = run.config.task, run.config.train
    assert (task.seq_len, task.num_tokens, t.batch_size, t.num_steps) == (256, 16, 16, 2000)
  assert {"mamba", "attention", "mamba2", "hybrid"} <= {r.tags["model"] for r in induction}
  for run in induction:
    config_lib.validate(run.config)
    assert run.config.task.seq_len == 256 and run.config.task.vocab_size == 16
    assert len(run.config.model.pattern) == 2 and run.config.model.d_model == 64
  assert sweep.TEST_LOG2[0] == 6 and sweep.TEST_LOG2[-1] == 20
  assert [r.name for r in experiments.select(list(runs.values()), "induction-mamba")] == [
      "induction-mamba"]
  steps = {r.name: r.config.train.num_steps for r in induction}
  assert steps["induction-mamba"] == 10_000 and steps["induction40k-mamba"] == 40_000
  assert steps["cpu-induction-mamba"] == 2_000 and runs["cpu-induction-mamba"].tags["setting"] == "cpu"
  assert {n.split("-", 1)[1] for n in steps if n.startswith("induction40k-")} == {
      n.split("-", 1)[1] for n in steps if n.startswith("induction-")}


def test_smoke_sweep_end_to_end_and_oom_stop(tmp_path, monkeypatch):
  s = study()
  res = str(tmp_path / "results")
  summary = experiments.run_study(s, smoke=True, out=str(tmp_path / "out"), results_dir=res)
  assert not summary["failed"] and len(summary["ok"]) == len(s.runs(smoke=True))
  records = {r["name"]: r for r in results_lib.load_results(res)}
  acc = records["induction-mamba"]["metrics"]["accuracy_by_log2_length"]
  assert sorted(acc) == ["4", "5", "6"] and all(0.0 <= v <= 1.0 for v in acc.values())
  assert records["induction-mamba"]["metrics"]["oom_at_log2_length"] is None
  assert 0.0 <= records["copy-mamba_s6-lr1.0e-03"]["metrics"]["accuracy"] <= 1.0

  # A length that runs out of memory ends the sweep and is recorded, not raised.
  sweep = s.sweep_module()
  real = sweep.scored_accuracy

  def short_memory(run, batches):
    batches = list(batches)
    if batches[0]["inputs"].shape[1] > 32:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
    return real(run, batches)
  monkeypatch.setattr(sweep, "scored_accuracy", short_memory)
  run = next(r for r in sweep.runs(smoke=True) if r.name == "induction-mamba")
  out = sweep.length_sweep([4, 5, 6, 7], tokens_per_length=64, batch_tokens=64, min_seqs=2,
                           max_seqs=2)(records["induction-mamba"]["workdir"], run.config)
  assert sorted(out["accuracy_by_log2_length"]) == ["4", "5"] and out["oom_at_log2_length"] == 6

  paths = experiments.plot_study(s, res, str(tmp_path / "plots"))
  assert sorted(os.path.basename(p) for p in paths) == ["induction_vs_length.png",
                                                        "selective_copying.png"]
  readme = tmp_path / "README.md"
  shutil.copy(s.readme, readme)
  table = experiments.table_study(s, res, str(readme))
  assert "| mamba_s6 | Mamba / S6 |" in table and "99.8" in table
  assert "| model | 2^4 | 2^5 | 2^6 |" in table and "| mamba (4 steps) |" in table
  assert table in readme.read_text()
