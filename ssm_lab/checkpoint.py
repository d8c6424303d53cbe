"""Checkpoints through orbax's CheckpointManager: save every K steps, keep N, resume from the latest.

A checkpoint holds the train state (step, params, optimizer state, skipped-step counters) and a JSON
record (the data position and the config). A latest checkpoint that fails to restore (truncated,
corrupt) is reported with a warning, moved to `<workdir>/checkpoints_unreadable/`, and the previous
one is used instead.

Sharded states (data parallel or FSDP, one or many processes) save as orbax's sharded arrays; restoring
with an abstract state whose ShapeDtypeStructs carry shardings puts every array straight onto its
target devices. With several processes every one of them calls save and restore (orbax coordinates
the writes), the processes agree on whether a checkpoint restored, and only the first moves a broken
one aside.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import orbax.checkpoint as ocp

from ssm_lab import parallel


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
      error: Exception | None = None
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as err:  # orbax raises assorted types for truncated or corrupt files
        error = err
      # Each process reads only its own shards: one failure anywhere means the step is unusable.
      if parallel.any_process(error is not None):
        aside = self._set_aside(step)
        why = f"{type(error).__name__}: {error}" if error else "failed on another process"
        logging.warning("checkpoint at step %d in %s could not be restored (%s); moved it to %s "
                        "and trying the previous one", step, self.directory, why, aside)
        continue
      return step, out.state, dict(out.meta)
    return None

  def _set_aside(self, step: int) -> str:
    """Moves a broken checkpoint out of the manager's way (kept for inspection, never deleted)."""
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory + "_unreadable"
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    if parallel.is_primary():
      os.makedirs(dst_root, exist_ok=True)
      os.replace(src, dst)
    parallel.barrier(f"ssm_lab_set_aside_{step}")
    self.manager.reload()
    return dst

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
