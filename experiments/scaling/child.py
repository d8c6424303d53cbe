"""One measurement point in a child process: its own device memory and peak, and a time limit, so a
point that runs out of memory or stalls (a compile that never ends) costs only itself.

The parent runs `python <part>.py --child ...` through `run_point`; the child prints its JSON with
`emit`, on a line of its own after a marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKER = "POINT_RESULT "


def run_point(script: str, args: list[str], timeout_s: float,
              env: dict[str, str] | None = None) -> dict[str, Any]:
  """`python script *args` with this checkout first on PYTHONPATH; the JSON the child emitted, or
  {"error": why} (timed out, failed, or printed nothing), with "timed_out" set on a timeout."""
  cmd = [sys.executable, os.path.abspath(script), *args]
  env = dict(os.environ, **(env or {}))
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s", "timed_out": True}
  found = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
  if proc.returncode == 0 and found:
    return json.loads(found[-1][len(MARKER):])
  tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
  return {"error": f"rc {proc.returncode}: {tail[:400]}"}


def emit(point: dict[str, Any]) -> None:
  """The child's result, for `run_point` to read."""
  print(MARKER + json.dumps(point), flush=True)
