"""Data parallel and FSDP training over simulated CPU devices, in one process and in two.

XLA reads its flags at start-up, so every multi-device run happens in a subprocess
(tests/train_driver.py) with `--xla_force_host_platform_device_count`. Runs of one test session
share a JAX compilation cache so that repeated configurations compile once.
"""

import importlib.util
import os
import socket
import subprocess

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ssm_lab import parallel
from ssm_lab.metrics import read_scalars

_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_driver.py")


def load_driver():
  spec = importlib.util.spec_from_file_location("train_driver", _DRIVER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


driver = load_driver()

# 12 eval examples: on 8 devices the eval batch is padded with 4 masked rows.
TASK = dict(name="mqar", vocab_size=32, seq_len=24, num_kv_pairs=3, num_eval_examples=12)
TRAIN = dict(batch_size=16, num_steps=3, warmup_steps=1, log_every=1, eval_every=3,
             checkpoint_every=3, progress_bar=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def run_driver(spec, *, devices, cache_dir, timeout=240):
  proc = driver.launch(spec, devices=devices, cache_dir=cache_dir, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return driver.results(out)


def losses(workdir):
  return [v for _, v in read_scalars(os.path.join(workdir, "train"))["loss"]]


def test_fsdp_spec_shards_the_largest_divisible_axis():
  assert parallel.fsdp_spec((64, 48), 8) == P("data")
  assert parallel.fsdp_spec((48, 64), 8) == P(None, "data")
  assert parallel.fsdp_spec((12, 40), 8) == P(None, "data")  # 12 does not divide; 40 does
  assert parallel.fsdp_spec((6, 10), 4) == P()                # nothing divides: replicated
  assert parallel.fsdp_spec((4,), 8) == P()                   # smaller than the device count
  assert parallel.fsdp_spec((), 8) == P()                     # scalars (step counters)
  assert parallel.fsdp_spec((64, 64), 1) == P()
  assert parallel.fsdp_spec((16, 16), 8) == P("data")         # ties: the first axis


def test_pad_rows_marks_padding_and_keeps_data():
  batch = {"inputs": np.arange(10).reshape(5, 2), "loss_mask": np.ones((5, 2), np.float32)}
  padded, real = parallel.pad_rows(batch, 4)
  assert real == 5 and padded["inputs"].shape == (8, 2)
  np.testing.assert_array_equal(padded["inputs"][:5], batch["inputs"])
  np.testing.assert_array_equal(padded["example_mask"], [1, 1, 1, 1, 1, 0, 0, 0])


def test_distributed_args_are_checked_before_joining():
  with pytest.raises(ValueError, match="num_processes"):
    parallel.initialize_distributed("127.0.0.1:1", None, 0)
  with pytest.raises(ValueError, match="process_id"):
    parallel.initialize_distributed("127.0.0.1:1", 2, 2)
  with pytest.raises(ValueError, match="coordinator"):
    parallel.initialize_distributed(None, 2, 1)
  assert parallel.initialize_distributed(None, None, None) is False


@pytest.mark.parametrize("pattern", [
    "A",
    # The Mamba scan doubles the compile time: the hybrid runs in the nightly (slow) target.
    pytest.param("AM", marks=pytest.mark.slow),
])
def test_eight_devices_dp_and_fsdp_match_one_device(tmp_path, cache_dir, pattern):
  """Same global batches, same initial parameters: the loss trajectory must not depend on the
  device count or on how the state is sharded (up to float reassociation in the reductions)."""
  model = dict(pattern=pattern, d_model=32, attention=dict(num_heads=2, num_kv_heads=2),
               block_mlp=True)
  runs = [dict(workdir=str(tmp_path / "one"), mesh_devices=1),
          dict(workdir=str(tmp_path / "dp"), train=dict(TRAIN, parallelism="dp")),
          # FSDP with two micro-batches of 8 rows, one per device each.
          dict(workdir=str(tmp_path / "fsdp"),
               train=dict(TRAIN, parallelism="fsdp", grad_accum_steps=2))]
  out = run_driver(dict(task=TASK, model=model, train=TRAIN, runs=runs), devices=8,
                   cache_dir=cache_dir)
  one, dp, fsdp = out
  assert (one["devices"], dp["devices"], fsdp["devices"]) == (1, 8, 8)
  ref = losses(runs[0]["workdir"])
  assert len(ref) == 3 and np.all(np.isfinite(ref))
  for r in runs[1:]:
    np.testing.assert_allclose(losses(r["workdir"]), ref, rtol=2e-5)
  assert dp["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=2e-5)
  assert fsdp["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=2e-5)
  # dp replicates everything; fsdp shards every parameter here (all have an axis divisible by 8)
  # and keeps each Adam moment sharded like its parameter, also after a restore.
  assert dp["sharded"] == 0
  assert fsdp["sharded"] == fsdp["param_leaves"] > 0
  assert fsdp["moments_match"] and fsdp["restored_step"] == 3


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(spec, cache_dir, timeout=240):
  port = _free_port()
  procs = [driver.launch(dict(spec, coordinator=f"127.0.0.1:{port}", num_processes=2,
                              process_id=i), devices=1, cache_dir=cache_dir,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, out in zip(procs, outs, strict=True):
    assert proc.returncode == 0, out[-4000:]
  return [driver.results(out)[0] for out in outs]


def test_two_processes_train_checkpoint_and_resume(tmp_path, cache_dir):
  """Two processes on localhost (jax.distributed over gloo), one CPU device each, FSDP: train to a
  checkpoint, exit, resume in a fresh pair of processes, and match a single-process run."""
  model = dict(pattern="A", d_model=32, attention=dict(num_heads=2, num_kv_heads=2))
  train_cfg = dict(TRAIN, num_steps=4, checkpoint_every=2, eval_every=4, parallelism="fsdp")
  spec = dict(task=TASK, model=model, train=train_cfg, workdir=str(tmp_path / "multi"))
  first = _two_processes(dict(spec, stop_at=2), cache_dir)
  assert [r["restored_step"] for r in first] == [2, 2]
  assert [r["devices"] for r in first] == [2, 2]
  second = _two_processes(spec, cache_dir)
  assert [r["restored_step"] for r in second] == [4, 4]
  assert second[0]["eval"] == second[1]["eval"]
  assert second[0]["sharded"] > 0 and second[0]["moments_match"]

  single = run_driver(dict(spec, workdir=str(tmp_path / "single")), devices=1,
                      cache_dir=cache_dir)[0]
  # Process 0 alone wrote TensorBoard events: steps 1-2 from the first pair, 3-4 after resuming.
  multi_loss = read_scalars(str(tmp_path / "multi" / "train"))["loss"]
  assert [s for s, _ in multi_loss] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in multi_loss], losses(str(tmp_path / "single")),
                             rtol=2e-5)
  assert second[0]["eval"]["loss"] == pytest.approx(single["eval"]["loss"], rel=2e-5)


def test_padding_rows_do_not_count_in_classification_sums():
  """Eval batches are padded to a multiple of the device count; for a classifier (whose loss has no
  per-token mask) only `example_mask` keeps the padding out of loss, accuracy and count."""
  import jax.numpy as jnp  # noqa: PLC0415

  from ssm_lab import train  # noqa: PLC0415
  from ssm_lab.models import build_model  # noqa: PLC0415
  model = build_model(dict(pattern="A", d_model=16, attention=dict(num_heads=2, num_kv_heads=2),
                           head="classifier", num_classes=3), vocab_size=20)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(1, 20, (5, 12)).astype(np.int32),
           "labels": rng.integers(0, 3, (5,)).astype(np.int32),
           "pad_mask": np.ones((5, 12), np.float32)}
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"]
  padded, real = parallel.pad_rows(batch, 8)
  assert real == 5
  _, want = train.loss_and_metrics(params, batch, model, "classification")
  _, got = train.loss_and_metrics(params, padded, model, "classification")
  for key in ("loss_sum", "correct", "count"):
    assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6), key
  assert float(got["count"]) == 5
