"""Faults a long run meets: SIGTERM, kill -9, a NaN batch, a mistyped command-line override; and the
`--profile_steps` trace.

Signals and the command line are tested on real subprocesses (`python -m ssm_lab.train` or
tests/train_driver.py); the runs of a test session share a JAX compilation cache.
"""

import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab import train
from ssm_lab.metrics import read_scalars

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)


def load_driver():
  spec = importlib.util.spec_from_file_location("train_driver",
                                                os.path.join(_TESTS, "train_driver.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


driver = load_driver()

TASK = dict(name="mqar", vocab_size=32, seq_len=24, num_kv_pairs=3, num_eval_examples=16)
MODEL = dict(pattern="MA", d_model=32, attention=dict(num_heads=2, num_kv_heads=2))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _wait_for(path, proc, timeout=180):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"process exited (rc {proc.returncode}) before {path} appeared")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f"{path} did not appear within {timeout} s")
    time.sleep(0.02)


def _complete_steps(workdir):
  """Finalised checkpoint steps (orbax writes into a temporary directory, then renames it)."""
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def _losses(logdir):
  return dict(read_scalars(logdir)["loss"])


def test_kill_9_resumes_from_the_last_complete_checkpoint(tmp_path, cache_dir):
  """SIGKILL after the first checkpoint: the rerun resumes from the newest complete checkpoint and
  logs the losses an uninterrupted run logs for every later step."""
  train_cfg = dict(batch_size=8, num_steps=8, warmup_steps=2, log_every=1, eval_every=8,
                   checkpoint_every=2, progress_bar=False)
  spec = dict(task=TASK, model=MODEL, train=train_cfg)
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  proc = driver.launch(dict(spec, workdir=straight), cache_dir=cache_dir,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  straight_out = proc.communicate(timeout=240)[0]
  assert proc.returncode == 0, straight_out[-3000:]

  # Slow batches (0.3 s each) so that the kill lands mid-run, right after checkpoint 2 is final.
  log = open(tmp_path / "killed.log", "w")
  proc = driver.launch(dict(spec, workdir=killed, step_delay=0.3), cache_dir=cache_dir,
                       stdout=log, stderr=subprocess.STDOUT)
  _wait_for(os.path.join(killed, "checkpoints", "2"), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  log.close()
  assert proc.returncode == -signal.SIGKILL
  complete = _complete_steps(killed)
  assert complete and complete[-1] < 8, complete
  resume_from = complete[-1]
  # Keep the killed run's events apart, so that the rerun's losses are read on their own.
  shutil.move(os.path.join(killed, "train"), os.path.join(killed, "train_killed"))

  proc = driver.launch(dict(spec, workdir=killed), cache_dir=cache_dir, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  out = proc.communicate(timeout=240)[0]
  assert proc.returncode == 0, out[-3000:]
  assert f"resumed from step {resume_from}" in out
  want, got = _losses(os.path.join(straight, "train")), _losses(os.path.join(killed, "train"))
  assert sorted(got) == list(range(resume_from + 1, 9))
  for step in got:
    assert got[step] == pytest.approx(want[step], rel=1e-6), step
  assert driver.results(out)[0]["eval"] == driver.results(straight_out)[0]["eval"]


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory, cache_dir):
  """`python -m ssm_lab.train` with --profile_steps, sent SIGTERM once checkpoint 20 exists."""
  tmp = tmp_path_factory.mktemp("sigterm")
  config_file = tmp / "tiny.py"
  config_file.write_text(textwrap.dedent(f"""
      import ml_collections
      from ssm_lab.config import base_config

      def get_config():
        config = base_config()
        config.task = ml_collections.ConfigDict({TASK!r})
        for k, v in {MODEL!r}.items():
          config.model[k] = v
        t = config.train
        t.batch_size, t.num_steps, t.warmup_steps = 8, 100000, 2
        t.log_every, t.eval_every, t.checkpoint_every = 10, 100000, 20
        t.progress_bar = False
        return config
      """))
  workdir = tmp / "run"
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  log = open(tmp / "log.txt", "w")
  proc = subprocess.Popen([sys.executable, "-m", "ssm_lab.train", f"--config={config_file}",
                           f"--workdir={workdir}", "--profile_steps=2:4"], cwd=_REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
  _wait_for(os.path.join(workdir, "checkpoints", "20"), proc)
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=120)
  log.close()
  return rc, (tmp / "log.txt").read_text(), str(workdir)


def test_sigterm_checkpoints_and_exits_cleanly(sigterm_run):
  rc, log, workdir = sigterm_run
  assert rc == 0, log[-3000:]
  line = [ln for ln in log.splitlines() if ln.startswith("SIGTERM: checkpointed step")]
  assert len(line) == 1, log[-3000:]
  step = int(line[0].split()[3])
  assert 20 <= step < 100000
  assert _complete_steps(workdir)[-1] == step


def test_profile_steps_flag_writes_a_trace(sigterm_run):
  _, log, workdir = sigterm_run
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert traces, log[-3000:]
  assert os.path.getsize(traces[0]) > 0
  with open(os.path.join(workdir, "config.json")) as f:
    assert '"profile_steps": "2:4"' in f.read()


def test_mistyped_override_on_the_command_line_is_a_clear_error(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "ssm_lab.train", "--config=configs/quickstart.py",
                         f"--workdir={workdir}", "--config.train.batch_sise=3"], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.train.batch_sise" in proc.stderr and "batch_size" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert not workdir.exists()
  # An ill-typed value is reported just as plainly.
  proc = subprocess.run([sys.executable, "-m", "ssm_lab.train", "--config=configs/quickstart.py",
                         f"--workdir={workdir}", "--config.train.batch_size=eight"], cwd=_REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "batch_size" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert not workdir.exists()


def test_an_isolated_nan_batch_is_skipped_and_counted(tmp_path, monkeypatch):
  real = train.make_task

  def make_task(cfg):
    task = real(cfg)
    inner = task.train_batch

    def train_batch(step, batch_size):
      batch = inner(step, batch_size)
      if step == 2:  # the batch of the third update carries a NaN weight
        batch = dict(batch, loss_mask=np.where(batch["loss_mask"] > 0, np.nan, 0.0).astype(
            np.float32))
      return batch
    task.train_batch = train_batch
    return task
  monkeypatch.setattr(train, "make_task", make_task)
  config = config_lib.base_config()
  config.task = ml_collections.ConfigDict(TASK)
  for k, v in MODEL.items():
    config.model[k] = v
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps, t.max_bad_steps = 8, 5, 1, 2
  t.log_every, t.eval_every, t.checkpoint_every, t.progress_bar = 1, 5, 5, False
  metrics = train.train_and_evaluate(config, str(tmp_path))
  scalars = read_scalars(str(tmp_path / "train"))
  assert [v for _, v in scalars["skipped_steps"]] == [0, 0, 1, 1, 1]
  loss = dict(scalars["loss"])
  assert not np.isfinite(loss[3]) and all(np.isfinite(loss[s]) for s in (1, 2, 4, 5))
  assert np.isfinite(metrics["loss"])
  step, params = _latest_params(str(tmp_path))
  assert step == 5 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def _latest_params(workdir):
  ckpt = train.Checkpointer(workdir, keep=3, save_every=1)
  step, state, _ = ckpt.restore_latest(None)
  ckpt.close()
  return step, state["params"]
