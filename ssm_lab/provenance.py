"""Which code produced a result: the git commit that benchmark and experiment scripts record.

Kept free of JAX imports, so a parent process that only launches measured subprocesses can use it.
"""

from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(explicit: str | None = None) -> str:
  """The commit to record: `explicit` (a --commit flag) if given, else $GIT_COMMIT, else
  `git rev-parse --short HEAD` of this checkout, else "unknown".

  Pass it explicitly on copies whose git metadata may not match the tree (the device machine's
  copy of a checkout reported a stale HEAD on 2026-11-23)."""
  if explicit:
    return explicit
  if os.environ.get("GIT_COMMIT"):
    return os.environ["GIT_COMMIT"]
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=10)
    return out.stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"
