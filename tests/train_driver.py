"""Runs `ssm_lab.train.train_and_evaluate` in a subprocess for the parallelism and fault tests.

`python tests/train_driver.py SPEC_JSON`, where SPEC_JSON holds:
  workdir, task, model, train  the run (task/model/train fields over `base_config()`)
  stop_at                      optional, passed to train_and_evaluate
  mesh_devices                 optional: train on the first N devices only (default: all)
  step_delay                   optional seconds slept before each training batch (to kill mid-run)
  coordinator, num_processes, process_id   optional: join a multi-process run first
  runs                         optional list of specs run one after another in this process (each
                               overrides the fields above), to pay JAX's start-up once
Prints one line `DRIVER_RESULT <json>` per run: process index, device count, eval metrics, and the
shardings of the restored final state ("sharded": params whose shards are smaller than the array,
"moments_match": every Adam moment sharded like its parameter).

XLA flags (device count) must be set in the environment before this starts; `launch` does that
for the tests, which load this file with `load_driver()`.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import ml_collections  # noqa: E402

from ssm_lab import config as config_lib  # noqa: E402
from ssm_lab import parallel  # noqa: E402
from ssm_lab import train  # noqa: E402


def build_config(spec: dict) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.task = ml_collections.ConfigDict(spec["task"])
  for group in ("model", "train"):
    for key, value in spec.get(group, {}).items():
      config[group][key] = value
  return config


def slow_tasks(delay: float) -> None:
  """Makes every training batch take `delay` seconds longer."""
  real = train.make_task

  def make(cfg):
    task = real(cfg)
    inner = task.train_batch

    def train_batch(step, batch_size):
      time.sleep(delay)
      return inner(step, batch_size)
    task.train_batch = train_batch
    return task
  train.make_task = make


def run(spec: dict) -> None:
  config = build_config(spec)
  if spec.get("step_delay"):
    slow_tasks(spec["step_delay"])
  n = spec.get("mesh_devices")
  mesh = parallel.make_mesh(jax.devices()[:n] if n else None)
  metrics = train.train_and_evaluate(config, spec["workdir"], stop_at=spec.get("stop_at"),
                                     mesh=mesh)
  result = {"process": jax.process_index(), "devices": mesh.size, "eval": metrics,
            "parallelism": config.train.parallelism}
  result.update(restored_shardings(spec["workdir"], config, mesh))
  print("DRIVER_RESULT " + json.dumps(result), flush=True)


def restored_shardings(workdir: str, config: ml_collections.ConfigDict, mesh) -> dict:
  """Restores the newest checkpoint with the training shardings and describes them."""
  abstract = train.abstract_train_state(config)
  shardings = parallel.state_shardings(abstract, mesh, config.train.parallelism)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  ckpt = train.Checkpointer(workdir, keep=10, save_every=1)
  step, state, _ = ckpt.restore_latest(target)
  ckpt.close()
  leaves = jax.tree.leaves(state.params)
  sharded = sum(1 for x in leaves if x.addressable_shards[0].data.shape != x.shape)
  moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if any(getattr(k, "name", None) in ("mu", "nu") for k in path)]
  moments_match = len(moments) == 2 * len(leaves) and all(
      m.sharding == p.sharding for m, p in zip(moments, leaves + leaves, strict=True))
  return {"restored_step": int(step), "param_leaves": len(leaves), "sharded": sharded,
          "moments_match": moments_match,
          "dtypes": sorted({str(x.dtype) for x in leaves + moments})}


def main() -> None:
  spec = json.loads(sys.argv[1])
  if spec.get("coordinator"):
    parallel.initialize_distributed(spec["coordinator"], spec["num_processes"],
                                    spec["process_id"])
  for override in spec.pop("runs", None) or [{}]:
    run({**spec, **override})



def launch(spec: dict, *, devices: int = 1, cache_dir: str | None = None, **popen_kw):
  """Starts this driver on `spec` in a subprocess with `devices` CPU devices (a Popen).

  `cache_dir`: a JAX compilation cache shared by the subprocesses of a test session, so that
  repeated runs of one configuration compile once.
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)], env=env,
                          **popen_kw)


def results(output: str) -> list[dict]:
  """The DRIVER_RESULT records in a driver's output."""
  return [json.loads(line.split(" ", 1)[1]) for line in output.splitlines()
          if line.startswith("DRIVER_RESULT ")]


if __name__ == "__main__":
  main()
