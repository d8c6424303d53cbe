"""notebooks/quickstart.ipynb runs end to end on a tiny finished run."""

import os

import ml_collections
import nbclient
import nbformat

from ssm_lab import config as config_lib
from ssm_lab import train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_quickstart_notebook_executes_on_a_tiny_run(tmp_path, monkeypatch):
  config = config_lib.base_config()
  config.task = ml_collections.ConfigDict(dict(name="mqar", vocab_size=32, seq_len=24,
                                               num_kv_pairs=3, num_eval_examples=16))
  config.model.pattern = "M"
  config.model.d_model = 16
  t = config.train
  t.batch_size, t.num_steps, t.log_every, t.eval_every, t.checkpoint_every = 4, 4, 2, 4, 2
  t.warmup_steps, t.progress_bar = 1, False
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  monkeypatch.setenv("SSM_LAB_RUN", workdir)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "recall accuracy on" in outputs
  assert "step 4" in outputs


def test_scaling_notebook_executes_from_committed_results(monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "scaling.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "results:" in outputs and "Edge" in outputs


def test_ranking_notebook_executes_with_and_without_results(tmp_path, monkeypatch):
  import json  # noqa: PLC0415
  monkeypatch.setenv("MPLBACKEND", "Agg")
  record = {"name": "mamba2", "status": "ok", "tags": {"kind": "reranker", "backbone": "mamba2"},
            "metrics": {"params": 3e7, "scifact.lce.rerank_nDCG@10.mean": 0.5,
                        "scifact.lce.rerank_nDCG@10.std": 0.01},
            "device": {"kind": "cpu", "count": 1}}
  for results, expected in ((tmp_path / "none", "not yet measured"), (tmp_path / "some", "| mamba2 |")):
    results.mkdir()
    if "some" in str(results):
      (results / "mamba2.json").write_text(json.dumps(record))
    monkeypatch.setenv("SSM_LAB_RANKING_RESULTS", str(results))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "ranking.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])
    assert expected in outputs
