"""`python -m ssm_lab.ops info` on the CPU: backend, devices and the impl `auto` picks per op."""

from __future__ import annotations

import json
import subprocess
import sys

from ssm_lab.ops import __main__ as ops_main


def test_info_names_backend_devices_and_auto_picks():
  rep = ops_main.info()
  assert rep["backend"] == "cpu" and rep["devices"] and rep["devices"][0].startswith("cpu:")
  assert set(rep["ops"]) == {"selective_scan", "ssd", "attention"}
  # On a CPU the Pallas kernels are never picked automatically.
  assert rep["ops"]["selective_scan"]["auto"] == "associative"
  assert rep["ops"]["ssd"]["auto"] == "chunked"
  assert rep["ops"]["attention"]["auto"] == "xla"
  assert all("pallas" in r["registered"] for r in rep["ops"].values())


def test_info_command_line():
  out = subprocess.run([sys.executable, "-m", "ssm_lab.ops", "info", "--json"], capture_output=True,
                       text=True, timeout=300, check=True).stdout
  assert json.loads(out)["ops"]["selective_scan"]["auto"] == "associative"
  text = subprocess.run([sys.executable, "-m", "ssm_lab.ops", "info"], capture_output=True, text=True,
                        timeout=300, check=True).stdout
  assert "backend cpu" in text and "selective_scan" in text and "auto -> associative" in text
