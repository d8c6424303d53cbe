"""A toy study written into a temporary experiments folder: measurement runs (instant, one that fails
until a marker file exists) and tiny training runs, with a plot.py and a README holding a table block."""

from __future__ import annotations

import textwrap

import pytest

SWEEP = '''
"""Toy study for the runner tests."""
import os
import time

from lm_helpers import tiny_study_config as tiny

from ssm_lab.experiments import Run, best_over, markdown_table, pivot

STATE = os.environ["TOY_STATE_DIR"]


def measure(x):
  def fn():
    time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
    return {"value": 2.0 * x}
  return fn


def flaky():
  if not os.path.exists(os.path.join(STATE, "fixed")):
    raise RuntimeError("flaky measurement broke\\nsecond line")
  return {"value": 1.0}




def long_eval(workdir, config):
  assert os.path.exists(os.path.join(workdir, "config.json"))
  return {"extra": float(config.train.learning_rate)}


def runs(smoke=False):
  out = [Run(name=f"m{x}", fn=measure(x), tags={"kind": "m", "x": x}) for x in (1, 2, 3)]
  out.append(Run(name="flaky", fn=flaky, tags={"kind": "f", "x": 0}))
  if smoke:
    out.append(Run(name="train-lr1e-2", config=tiny(1e-2), evaluate=long_eval,
                   tags={"kind": "t", "x": 1, "lr": 1e-2}))
    out.append(Run(name="train-early", config=tiny(1e-2, steps=6, eval_every=2),
                   tags={"kind": "t", "x": 2, "lr": 1e-2}, early_stop=("accuracy", -1.0)))
  return out


def table(results):
  best = best_over(results, key="lr", metric_key="value")
  header, rows = pivot(best, rows=("kind",), col="x", value=lambda r: r["metrics"].get("value"))
  return markdown_table(header, rows)
'''

PLOT = '''
"""Toy plot."""
import os


def plot(results, out_dir):
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots()
  ax.plot([r["tags"]["x"] for r in results], [r["metrics"].get("value", 0) for r in results], "o")
  path = os.path.join(out_dir, "toy.png")
  fig.savefig(path)
  plt.close(fig)
  return [path]
'''

README = """# Toy

<!-- results-table:start -->
(old table)
<!-- results-table:end -->

Verdict.
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
  """(experiments_dir, state_dir): a folder with the study `toy`, and the flaky run's marker folder."""
  root, state = tmp_path / "experiments", tmp_path / "state"
  (root / "toy").mkdir(parents=True)
  state.mkdir()
  (root / "toy" / "sweep.py").write_text(textwrap.dedent(SWEEP))
  (root / "toy" / "plot.py").write_text(textwrap.dedent(PLOT))
  (root / "toy" / "README.md").write_text(README)
  monkeypatch.setenv("TOY_STATE_DIR", str(state))
  monkeypatch.setenv("SSM_LAB_EXPERIMENTS_DIR", str(root))
  return root, state
