"""Figures and the README table of a study, rebuilt from its result files (never typed by hand).

A study's `plot.py` may define `plot(results, out_dir) -> list[str]` (paths of the PNGs it wrote) and
`table(results) -> str` (markdown); `table` may live in `sweep.py` instead. Both get the "ok" records.
"""

from __future__ import annotations

import os
from typing import Any

from ssm_lab.experiments import results as results_lib
from ssm_lab.experiments.study import Study


def plot_study(study: Study, results_dir: str, out_dir: str) -> list[str]:
  """Calls the study's `plot` on its ok results; returns the paths written."""
  plot = study.hook("plot")
  if plot is None:
    raise AttributeError(f"study {study.name!r} has no plot(results, out_dir) in "
                         f"{study.path}/plot.py or sweep.py")
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  os.makedirs(out_dir, exist_ok=True)
  paths = list(plot(results_lib.load_results(results_dir), out_dir))
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"{study.path}/plot.py: plot() returned paths it did not write: {missing}")
  return paths


def table_study(study: Study, results_dir: str, readme: str | None = None) -> str:
  """The study's markdown table of its ok results; written into `readme`'s results-table block when
  `readme` is given."""
  table = study.hook("table")
  if table is None:
    raise AttributeError(f"study {study.name!r} has no table(results) in {study.path}/plot.py or "
                         f"sweep.py")
  text: Any = table(results_lib.load_results(results_dir))
  if not isinstance(text, str):
    raise TypeError(f"{study.path}: table() must return a markdown string, got {type(text).__name__}")
  if readme is not None:
    results_lib.rewrite_readme_table(readme, text)
  return text
