"""Result records and table helpers: atomic writes, best-of-sweep selection, pivots, README blocks,
and set_mixer on the mixer groups."""

from __future__ import annotations

import os

import pytest

from ssm_lab import config as config_lib
from ssm_lab.experiments import results, set_mixer


def rec(name, lr, acc, model="mamba", d=64, status="ok"):
  return {"name": name, "status": status, "tags": {"model": model, "d_model": d, "lr": lr},
          "metrics": {"accuracy": acc} if acc is not None else {}}


def test_best_over_picks_the_best_learning_rate_per_group():
  rs = [rec("a", 1e-3, 0.5), rec("b", 1e-2, 0.9), rec("c", 1e-4, float("nan")),
        rec("d", 1e-3, 0.99, status="failed"), rec("e", 1e-3, 0.3, d=128), rec("f", 1e-2, None, d=128),
        rec("g", 1e-3, None, d=256, status="failed")]
  best = results.best_over(rs, key="lr", metric_key="accuracy")
  assert [r["name"] for r in best] == ["b", "e"]  # the d=256 group has no finished run
  assert best[0]["best_over"] == {"key": "lr", "values": [0.0001, 0.001, 0.01], "tried": 4, "ok": 2}
  assert [r["name"] for r in results.best_over(rs, mode="min")] == ["a", "e"]
  with pytest.raises(ValueError, match="mode"):
    results.best_over(rs, mode="median")


def test_pivot_and_markdown_table():
  rs = [rec("a", 1e-3, 0.5, d=128), rec("b", 1e-3, 0.25, d=64), rec("c", 1e-3, 1.0, model="attention")]
  header, rows = results.pivot(rs, rows=("model",), col="d_model", value=lambda r: r["metrics"]["accuracy"])
  assert header == ["model", "d_model=64", "d_model=128"]
  assert rows == [["attention", 1.0, None], ["mamba", 0.25, 0.5]]
  assert results.markdown_table(header, rows).splitlines() == [
      "| model | d_model=64 | d_model=128 |", "| --- | --- | --- |", "| attention | 1 | – |",
      "| mamba | 0.25 | 0.5 |"]


def test_results_are_written_atomically_and_read_back(tmp_path):
  import numpy as np
  path = results.write_result(str(tmp_path), {"name": "r1", "status": "ok",
                                              "metrics": {"x": np.float32(0.5)}})
  assert path == str(tmp_path / "r1.json") and os.listdir(tmp_path) == ["r1.json"]
  assert results.read_result(str(tmp_path), "r1")["metrics"] == {"x": 0.5}
  assert results.read_result(str(tmp_path), "r2") is None
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="bad.json is not valid JSON"):
    results.load_results(str(tmp_path))


def test_readme_block_is_replaced_and_its_absence_named():
  text = f"a\n{results.TABLE_START}\nold\n{results.TABLE_END}\nb\n"
  assert results.replace_table_block(text, "| new |\n") == (
      f"a\n{results.TABLE_START}\n| new |\n{results.TABLE_END}\nb\n")
  with pytest.raises(ValueError, match="x/README.md has no"):
    results.replace_table_block("no block", "t", where="x/README.md")


def test_commit_is_recorded():
  commit = results.git_commit()
  assert commit == "unknown" or len(commit.split("+")[0]) == 40


def test_set_mixer_writes_group_fields_and_names_unknown_ones():
  config = config_lib.base_config()
  set_mixer(config, "mamba2", d_state=128, head_dim=32)
  set_mixer(config, "attention", num_heads=1, impl="xla")
  assert (config.model.mamba2.d_state, config.model.mamba2.head_dim) == (128, 32)
  assert (config.model.attention.num_heads, config.model.attention.impl) == (1, "xla")
  with pytest.raises(KeyError, match="config.model.mamba2 has no field 'ssd_d_state'"):
    set_mixer(config, "mamba2", ssd_d_state=1)
  with pytest.raises(KeyError, match="no mixer group 'nope'"):
    set_mixer(config, "nope", order=2)
