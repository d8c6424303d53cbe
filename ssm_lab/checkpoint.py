"""Checkpoints through orbax's CheckpointManager: save every K steps, keep N, resume from the latest.

A checkpoint holds the train state (step, params, optimizer state, skipped-step counters) and a JSON
record (the data position and the config). A latest checkpoint that fails to restore (truncated,
corrupt) is reported with a warning, moved to `<workdir>/checkpoints_unreadable/`, and the previous
one is used instead.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import orbax.checkpoint as ocp


class Checkpointer:
  """Wraps `ocp.CheckpointManager` for one workdir (`<workdir>/checkpoints`)."""

  def __init__(self, workdir: str, *, keep: int, save_every: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                             create=True))

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)),
                              force=force)
    return bool(saved)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint that restores, or None when there is none."""
    for step in reversed(self.steps()):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as err:  # orbax raises assorted types for truncated or corrupt files
        aside = self._set_aside(step)
        logging.warning("checkpoint at step %d in %s could not be restored (%s: %s); moved it to "
                        "%s and trying the previous one", step, self.directory,
                        type(err).__name__, err, aside)
        continue
      return step, out.state, dict(out.meta)
    return None

  def _set_aside(self, step: int) -> str:
    """Moves a broken checkpoint out of the manager's way (kept for inspection, never deleted)."""
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory + "_unreadable"
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    os.replace(src, dst)
    self.manager.reload()
    return dst

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
