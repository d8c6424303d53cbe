"""Checkpoints through orbax's CheckpointManager: save every K steps, keep N, resume from the latest.

A checkpoint holds the train state (step, params, optimizer state, skipped-step counters) and a JSON
record (the data position, the config, and integrity data). A latest checkpoint that fails to restore
(truncated, corrupt, altered) is reported with a warning naming the step and the file or array,
moved to `<workdir>/checkpoints_unreadable/`, and the previous one is used instead.

Integrity: orbax's files carry no checksums, so bytes changed in place restore silently as wrong
numbers. Two records catch that:
  * array hashes: the SHA-256 of every array, computed from the in-memory state at save time and
    stored in the JSON record, which orbax writes atomically with the arrays. Restore hashes what it
    read and compares. This covers any damage that still decodes.
  * a file manifest: `<step>/integrity.json`, the size and SHA-256 of every file of the finished
    checkpoint, written once orbax has finalised it (saves are asynchronous, so it is written when
    the next save starts or the manager closes). Restore checks it before reading anything, which
    covers altered metadata, truncated and deleted files. A checkpoint without a manifest (a run
    killed in between, or one written before manifests existed) is restored on its array hashes
    alone, with a warning.

Sharded states (data parallel or FSDP, one or many processes) save as orbax's sharded arrays; restoring
with an abstract state whose ShapeDtypeStructs carry shardings puts every array straight onto its
target devices. With several processes every one of them calls save and restore (orbax coordinates
the writes), the processes agree on whether a checkpoint restored, and only the first moves a broken
one aside. Each process hashes what it holds whole: the first process's hashes are the ones recorded,
so arrays sharded across processes (FSDP) are covered by the file manifest only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from ssm_lab import parallel

MANIFEST = "integrity.json"


class CheckpointIntegrityError(Exception):
  """A checkpoint's files or arrays differ from what was recorded when it was saved."""


@dataclasses.dataclass
class SetAside:
  """A checkpoint moved to `checkpoints_unreadable/`: its step, new location and why."""
  step: int
  path: str
  reason: str


def leaf_name(path: tuple) -> str:
  """'params/block_0/mixer/D' for a pytree path, the same for a TrainState and the dict orbax
  returns without a target (attribute, key and index entries all become their bare names)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _whole_local_copy(x: Any) -> np.ndarray | None:
  """The array's values when this process holds all of them (one shard the array's size)."""
  if isinstance(x, jax.Array):
    for shard in x.addressable_shards:
      if shard.data.shape == x.shape:
        return np.asarray(shard.data)
    return None
  return np.asarray(x)


def _digest(x: np.ndarray) -> str:
  h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
  h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def array_hashes(state: Any) -> dict[str, str]:
  """{leaf name: SHA-256 of dtype, shape and bytes} for every array this process holds whole."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    local = _whole_local_copy(x)
    if local is not None:
      out[leaf_name(path)] = _digest(local)
  return out


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(root: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root)
                for n in names if n != MANIFEST)


def write_manifest(step_dir: str) -> None:
  """Records the size and SHA-256 of every file of a finished checkpoint (atomically)."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _file_digest(os.path.join(step_dir,
                                                                                         rel))]
           for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, f".{MANIFEST}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump({"sha256": files}, f, indent=0)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def check_manifest(step_dir: str) -> str | None:
  """None when every file matches the manifest (or there is none); else what is wrong.

  Raises CheckpointIntegrityError naming the first file that is missing, resized or altered.
  Files added since are not read by a restore that the manifest passes, so they are ignored.
  """
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return f"no {MANIFEST}: verified on its array hashes only"
  try:
    with open(path) as f:
      files = json.load(f)["sha256"]
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise CheckpointIntegrityError(f"{path} is unreadable ({err})") from None
  for rel, (size, digest) in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      raise CheckpointIntegrityError(f"file {full} is missing")
    if os.path.getsize(full) != size:
      raise CheckpointIntegrityError(f"file {full} has {os.path.getsize(full)} bytes, not the "
                                     f"{size} it was saved with")
    if _file_digest(full) != digest:
      raise CheckpointIntegrityError(f"file {full} differs from the one saved (SHA-256 mismatch)")
  return None


def check_arrays(state: Any, recorded: dict[str, str] | None, step: int) -> None:
  """Raises CheckpointIntegrityError naming the first restored array whose hash differs."""
  if recorded is None:
    logging.warning("checkpoint at step %d has no array hashes (written before they existed); "
                    "its values are not verified", step)
    return
  got = array_hashes(state)
  for name, digest in recorded.items():
    if name in got and got[name] != digest:
      raise CheckpointIntegrityError(f"array {name!r} differs from the one saved (SHA-256 "
                                     f"mismatch)")


class Checkpointer:
  """Wraps `ocp.CheckpointManager` for one workdir (`<workdir>/checkpoints`)."""

  def __init__(self, workdir: str, *, keep: int, save_every: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                             create=True))
    self.set_aside: list[SetAside] = []  # checkpoints restore_latest moved out of the way
    self._unsealed: int | None = None  # a saved step whose file manifest is not written yet

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    self._seal()
    # Hashes of the in-memory values: what restore must read back (before orbax's async copy).
    meta = {**meta, "integrity": {"arrays": array_hashes(state)}}
    saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)),
                              force=force)
    if saved:
      self._unsealed = step
    return bool(saved)

  def _seal(self) -> None:
    """Waits for the pending save and writes its file manifest (first process only)."""
    self.manager.wait_until_finished()
    step, self._unsealed = self._unsealed, None
    if step is None:
      return
    step_dir = os.path.join(self.directory, str(step))
    if parallel.is_primary() and os.path.isdir(step_dir):  # gone if max_to_keep dropped it
      write_manifest(step_dir)

  def wait(self) -> None:
    self._seal()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint that restores and verifies, or None when there
    is none (`self.set_aside` then lists any that were moved aside)."""
    for step in reversed(self.steps()):
      error: Exception | None = None
      note = None
      if parallel.is_primary():  # one reader of the files, which every process shares
        try:
          note = check_manifest(os.path.join(self.directory, str(step)))
        except Exception as err:  # CheckpointIntegrityError, or the files vanished under us
          error = err
      # Restoring is collective: every process skips it, or none does.
      if not parallel.any_process(error is not None):
        try:
          out = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
          check_arrays(out.state, (out.meta.get("integrity") or {}).get("arrays"), step)
        except Exception as err:  # orbax raises assorted types for truncated or corrupt files
          error = err
      # Each process reads only its own shards: one failure anywhere means the step is unusable.
      if parallel.any_process(error is not None):
        why = f"{type(error).__name__}: {error}" if error else "failed on another process"
        aside = self._set_aside(step)
        self.set_aside.append(SetAside(step, aside, why))
        logging.warning("checkpoint at step %d in %s could not be restored (%s); moved it to %s "
                        "and trying the previous one", step, self.directory, why, aside)
        continue
      if note:
        logging.warning("checkpoint at step %d: %s", step, note)
      return step, out.state, dict(out.meta)
    return None

  def _set_aside(self, step: int, into: str = "_unreadable") -> str:
    """Moves checkpoint `step` out of the manager's way, to `<checkpoints><into>/<step>-<time>`
    (kept for inspection, never deleted)."""
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory + into
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    if parallel.is_primary():
      os.makedirs(dst_root, exist_ok=True)
      os.replace(src, dst)
    parallel.barrier(f"ssm_lab_set_aside_{step}")
    self.manager.reload()
    return dst

  def set_aside_after(self, step: int) -> str:
    """Moves every checkpoint newer than `step` to `<workdir>/checkpoints_ahead/` (kept, never
    deleted), so the next restore and save continue from `step`; returns that folder."""
    self._seal()
    for s in [s for s in self.steps() if s > step]:
      self._set_aside(s, into="_ahead")
    return self.directory + "_ahead"

  def close(self) -> None:
    self._seal()
    self.manager.close()


class WorkdirBusy(Exception):
  """Another live run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """`<workdir>/lock`: {host, pid} of the run that owns the workdir, so that a second run stops at
  once instead of both crashing at their first save.

  Created atomically (a complete temporary file hard-linked into place, so a reader never sees a
  half-written lock). A lock whose pid is dead on this host is stale (a run killed with -9) and is
  taken over with a warning; a lock from another host cannot be checked and is reported as busy.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), "lock")
    self.me = {"host": socket.gethostname(), "pid": os.getpid()}
    self.held = False

  def _read(self) -> dict[str, Any] | None:
    try:
      with open(self.path) as f:
        holder = json.load(f)
      return holder if isinstance(holder, dict) else None
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusy naming the holder."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = f"{self.path}.tmp-{self.me['host']}-{self.me['pid']}"
    with open(tmp, "w") as f:
      json.dump({**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    try:
      for _ in range(5):
        try:
          os.link(tmp, self.path)
          self.held = True
          return
        except FileExistsError:
          pass
        holder = self._read()
        if holder is None:  # released meanwhile
          continue
        host, pid = holder.get("host"), holder.get("pid")
        if host == self.me["host"] and isinstance(pid, int) and not _pid_alive(pid):
          self._take_stale(holder)
          continue
        raise WorkdirBusy(
            f"workdir {os.path.dirname(self.path)} is in use by pid {pid} on host {host} (lock "
            f"file {self.path}); wait for that run to end or use another --workdir"
            + ("" if host == self.me["host"] else "; if that run is gone, delete the lock file"))
      raise WorkdirBusy(f"could not take the lock {self.path}: other runs keep taking it")
    finally:
      os.remove(tmp)

  def _take_stale(self, holder: dict[str, Any]) -> None:
    # Rename rather than delete, so that of two runs taking over the same stale lock only one
    # succeeds; the loser's rename fails and it retries (and then finds a live holder).
    aside = f"{self.path}.stale-{self.me['pid']}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    logging.warning("took over the stale lock %s of pid %s on host %s (no such process)",
                    self.path, holder.get("pid"), holder.get("host"))
    os.remove(aside)

  def release(self) -> None:
    if self.held and self._read_own() is not None:  # never remove a lock another run took over
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self.held = False

  def _read_own(self) -> dict[str, Any] | None:
    holder = self._read()
    if holder and holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
      return holder
    return None
