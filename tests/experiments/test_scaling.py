"""The scaling study: the full sweep's units and settings, a CPU smoke of a few units end to end
(results, table, figures), and the table and figures drawn from the committed results."""

from __future__ import annotations

import os

from ssm_lab import config as config_lib
from ssm_lab import experiments
from ssm_lab.experiments import results as results_lib

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


def study():
  return experiments.get_study("scaling", EXPERIMENTS)


def test_full_sweep_lists_every_unit():
  runs = study().runs()
  names = {r.name for r in runs}
  assert {"ops-attention-xla", "ops-attention-cudnn-w1024", "ops-scan-pallas", "ops-ssd-chunked",
          "train-350m-hybrid", "gen-decode-mamba2-1.3b", "fits-closed-form",
          "fits-confirm-transformer-1.3b", "edge-mamba-130m"} <= names
  quality = [r for r in runs if r.config is not None]
  assert len(quality) == 4 * (3 * 3 + 3 + 3)
  for run in quality:
    config_lib.validate(run.config)
  hybrid = next(r for r in quality if r.tags["arch"] == "hybrid" and r.tags["size"] == "40m")
  assert hybrid.config.model.pattern.count("A") * 8 == len(hybrid.config.model.pattern)


def test_smoke_units_end_to_end(tmp_path):
  s = study()
  res = str(tmp_path / "results")
  summary = experiments.run_study(s, smoke=True, only="ops-attention-xla,gen-decode-mamba-tiny",
                                  out=str(tmp_path / "out"), results_dir=res)
  assert not summary["failed"] and len(summary["ok"]) == 2
  records = results_lib.load_results(res)
  ops = next(r for r in records if r["name"] == "ops-attention-xla")
  assert all(p["ms_pipelined"] > 0 and p["memory_bytes"] > 0 for p in ops["metrics"]["points"])
  paths = experiments.plot_study(s, res, str(tmp_path / "plots"))
  assert sorted(os.path.basename(p) for p in paths) == sorted(
      f"{w}.png" for w in ("ops", "train", "decode", "quality", "edge"))
  table = experiments.table_study(s, res)
  assert "attention-xla" in table and "not yet measured" in table


def test_growth_exponent_and_crossover():
  ops = study().sweep_module().part("ops")
  quad = [{"length": n, "ms_per_sequence": 1e-6 * n * n, "ms_pipelined": 1e-3 * n} for n in
          (2048, 4096, 8192)]
  lin = [{"length": n, "ms_per_sequence": 1e-3 * n, "ms_pipelined": 4.096} for n in (2048, 4096, 8192)]
  assert abs(ops.growth_exponent(quad) - 2) < 1e-9 and abs(ops.growth_exponent(lin) - 1) < 1e-9
  assert abs(ops.crossover(quad, lin) - 4096) < 1e-6
  assert ops.crossover(lin, quad) is None


def test_committed_results_give_the_table():
  s = study()
  table = experiments.table_study(s, s.results_dir)
  assert "(imported)" in table and "NVIDIA H200" in table


def test_quality_frontier_keeps_points_no_cheaper_point_beats():
  plot = study().plot_module()
  pts = [(4.0, 2.0), (1.0, 3.0), (2.0, 3.5), (3.0, 2.5), (8.0, 2.1)]
  assert plot.frontier(pts) == [(1.0, 3.0), (3.0, 2.5), (4.0, 2.0)]
  cpu = {"tags": {"size": "cpu1m"}, "config": {"task": {"tokenizer": "bytes"}}}
  gpu = {"tags": {"size": "5m"}, "config": {"task": {"tokenizer": "gpt-neox-20b"}}}
  assert plot._families([gpu, cpu]) == [[cpu], [gpu]]
