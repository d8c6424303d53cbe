"""The GPU benchmark scripts' CPU dry runs: each script runs end to end at tiny shapes and writes its
results, so a broken import or argument path is found here rather than in a device call (on
2026-11-23 one device run of benchmarks/selective_scan.py lost its associative and Pallas rows to an
import that only the full script exercises).

The fast ones run by default; the interpret-mode kernel scripts take minutes on 2 cores and are
marked slow (`.ci/run nightly` runs them).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
  assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-3000:])
  return proc


def test_train_throughput_tiny_with_precompile(tmp_path):
  """Every case compiles into the persistent cache first; the timed process then loads it."""
  _run("train_throughput.py", "--preset", "tiny", "--out", str(tmp_path), "--seq_len", "32",
       "--steps", "1", "--rounds", "1", "--cases", "mamba-tiny,mamba2-tiny",
       "--cache_dir", str(tmp_path / "cache"))
  res = json.loads((tmp_path / "train_throughput.json").read_text())
  assert [r["case"] for r in res["results"]] == ["mamba-tiny", "mamba2-tiny"]
  assert all("error" not in r and r["finite"] and r["tokens_per_s"] > 0 for r in res["results"])
  pre = res["meta"]["precompile"]
  assert all(isinstance(pre[c], float) for c in ("mamba-tiny", "mamba2-tiny")), pre
  assert any((tmp_path / "cache").iterdir())
  assert "compiled at once" in (tmp_path / "train_throughput.md").read_text()


def test_generation_smoke_and_merge(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _run("generation.py", "--smoke", "--out", str(a), "--models", "mamba-tiny,transformer-tiny",
       "--decode_models", "mamba-tiny", "--budget_s", "600")
  _run("generation.py", "--smoke", "--out", str(b), "--models", "transformer-tiny",
       "--budget_s", "600")
  ra = json.loads((a / "generation.json").read_text())
  assert {r["model"] for r in ra["decode"]} == {"mamba-tiny"}       # --decode_models
  assert {r["model"] for r in ra["context_memory"]} == {"mamba-tiny", "transformer-tiny"}
  _run("generation.py", "--out", str(tmp_path / "m"), "--merge", str(a / "generation.json"),
       str(b / "generation.json"))
  m = json.loads((tmp_path / "m" / "generation.json").read_text())
  measured = {(r["model"], r["batch"]) for r in m["decode"] if "tokens_per_s" in r}
  assert measured == {(n, bt) for n in ("mamba-tiny", "transformer-tiny") for bt in (1, 2)}
  assert {(r["model"], r["batch"]) for r in m["ratios"]} == {("mamba-tiny", 1), ("mamba-tiny", 2)}
  assert "Merged from several device calls" in (tmp_path / "m" / "generation.md").read_text()


@pytest.mark.slow
def test_selective_scan_smoke(tmp_path):
  _run("selective_scan.py", "--smoke", "--out", str(tmp_path), "--budget-s", "600")
  res = json.loads((tmp_path / "selective_scan.json").read_text())
  assert res["checks"] and all(c["ok"] for c in res["checks"]), res["checks"]
  timed = {(r["impl"], r["mode"]) for r in res["bench"] if "ms" in r}
  assert {("associative", "fwdbwd"), ("pallas", "fwdbwd")} <= timed


@pytest.mark.slow
def test_ssd_smoke(tmp_path):
  _run("ssd.py", "--smoke", "--out", str(tmp_path), "--commit", "test", "--rounds", "2")
  md = (tmp_path / "ssd.md").read_text()
  assert "| chunked |" in md and "| pallas |" in md


@pytest.mark.slow
def test_layer_breakdown_smoke(tmp_path):
  _run("layer_breakdown.py", "--smoke", "--out", str(tmp_path), "--workers", "2")
  assert any(p.suffix == ".json" for p in tmp_path.iterdir())
  md = next(p for p in tmp_path.iterdir() if p.suffix == ".md").read_text()
  assert "conv" in md and "layer" in md


def test_ceilings_follow_the_device_that_ran():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import ceilings  # noqa: PLC0415

  assert ceilings.for_device("NVIDIA H100 80GB HBM3") == ceilings.H100
  assert ceilings.for_device("NVIDIA H200") == ceilings.H200
  assert ceilings.H200.hbm_tb_s > ceilings.H100.hbm_tb_s
  cpu = ceilings.for_device("cpu")
  assert (cpu.hbm_tb_s, cpu.matmul_tf_s) == (ceilings.H100.hbm_tb_s, ceilings.H100.matmul_tf_s)
  assert "assumed" in cpu.source
