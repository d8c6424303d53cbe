"""Data parallelism and FSDP for `ssm_lab.train`, on JAX's own multi-controller runtime and sharding.

Every device of every process forms one 1-D `jax.sharding.Mesh` with the axis "data". Batches are
sharded on their batch axis over it. Parameters and optimizer state are either replicated ("dp") or,
under "fsdp", each array is sharded along its largest axis whose size the device count divides (the
rest are replicated); since the rule depends only on an array's shape, a parameter and its Adam
moments always get the same sharding. XLA inserts the collectives: an all-reduce of the gradients
under dp; under fsdp an all-gather of each parameter before use and a reduce-scatter of its gradient.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` when a coordinator is named
(flags or the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Each process
computes the same global batch (a pure function of (seed, step)) and feeds only its rows
(`shard_batch`), so results do not depend on the number of devices or processes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
PARALLELISMS = ("dp", "fsdp")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins a multi-process run when one is asked for; returns True when it called initialize.

  Arguments left None are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  With no coordinator address anywhere this is a single-process run and nothing is done (a cluster
  that JAX detects by itself, e.g. SLURM, can still be joined by calling
  `jax.distributed.initialize()` before training).
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if coordinator_address is None:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError(f"num_processes={num_processes} / process_id={process_id} given without a "
                       f"coordinator address (--coordinator_address or JAX_COORDINATOR_ADDRESS)")
    return False
  if num_processes is None or process_id is None:
    raise ValueError(f"coordinator_address={coordinator_address!r} needs num_processes and "
                     f"process_id too (got {num_processes}, {process_id})")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True


def make_mesh(devices: list[Any] | None = None) -> Mesh:
  """A 1-D mesh ("data",) over `devices` (default: every device of every process, process-major)."""
  devices = list(jax.devices() if devices is None else devices)
  # Process-major order keeps each process's batch rows one contiguous slice (see shard_batch).
  devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (DATA_AXIS,))


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """PartitionSpec sharding `shape` along its largest axis divisible by `num_shards` (ties: the
  first such axis); P() (replicated) when no axis is divisible or there is one shard."""
  if num_shards <= 1:
    return P()
  best = None
  for axis, size in enumerate(shape):
    if size % num_shards == 0 and size >= num_shards and (best is None or size > shape[best]):
      best = axis
  if best is None:
    return P()
  return P(*([None] * best + [DATA_AXIS]))


def state_shardings(abstract_state: Any, mesh: Mesh, parallelism: str) -> Any:
  """A NamedSharding for every leaf of `abstract_state` (arrays or ShapeDtypeStructs)."""
  if parallelism not in PARALLELISMS:
    raise ValueError(f"parallelism={parallelism!r} must be one of {list(PARALLELISMS)}")
  n = mesh.shape[DATA_AXIS]

  def one(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    spec = fsdp_spec(shape, n) if parallelism == "fsdp" else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a batch ([batch, ...]) split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, global_rows: int) -> slice:
  """The contiguous rows of a [global_rows, ...] batch that this process's devices hold."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
  starts = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_rows)
                   for idx in indices.values()})
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(stop - start for start, stop in starts)
  if covered != hi - lo:
    raise ValueError(f"process {jax.process_index()}'s devices hold non-contiguous rows {starts} of "
                     f"a {global_rows}-row batch; build the mesh with make_mesh")
  return slice(lo, hi)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays, sharded on axis 0, from the global batch `batch` ({name: [batch, ...]}) that
  every process holds; each process transfers only its own rows.

  Raises:
    ValueError: the batch size is not a multiple of the number of devices.
  """
  n = mesh.shape[DATA_AXIS]
  out = {}
  sharding = batch_sharding(mesh)
  rows = None
  for name, value in batch.items():
    value = np.asarray(value)
    if value.shape[0] % n:
      raise ValueError(f"batch field {name!r} has {value.shape[0]} rows (shape {value.shape}), not a "
                       f"multiple of the {n} devices of the mesh")
    if rows is None:
      rows = process_rows(mesh, value.shape[0])
    out[name] = jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
  return out


def pad_rows(batch: Mapping[str, np.ndarray], multiple: int) -> tuple[dict[str, np.ndarray], int]:
  """Pads every [batch, ...] field with zero rows up to a multiple of `multiple`, and adds
  `example_mask` float32 [batch] (1 on real rows, 0 on padding). Returns (batch, real rows)."""
  real = next(iter(batch.values())).shape[0]
  total = -(-real // multiple) * multiple
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    pad = np.zeros((total - real, *value.shape[1:]), value.dtype)
    out[name] = np.concatenate([value, pad]) if total > real else value
  out["example_mask"] = (np.arange(total) < real).astype(np.float32)
  return out, real


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a collective: every process must call)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def barrier(name: str) -> None:
  """Waits until every process got here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
  """The process that writes logs, TensorBoard events and config.json."""
  return jax.process_index() == 0
