"""Faults a long run meets: SIGTERM, kill -9, a NaN batch, a mistyped command-line override; and the
`--profile_steps` trace.

Signals and the command line are tested on real subprocesses (`python -m ssm_lab.train` or
tests/train_driver.py); the runs of a test session share a JAX compilation cache.
"""

import glob
import importlib.util
import json
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


# ------------------------------------------------------------------------------------------------
# Checkpoints damaged in place: every one is detected, set aside, and the previous one is used.

def tiny_config(steps=6, **train_kw):
  config = config_lib.base_config()
  config.task = ml_collections.ConfigDict(TASK)
  for k, v in MODEL.items():
    config.model[k] = v
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps = 8, steps, 2
  t.log_every, t.eval_every, t.checkpoint_every, t.progress_bar = 1, steps, 3, False
  for k, v in train_kw.items():
    t[k] = v
  return config


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A workdir with checkpoints 3 and 6 (copied by each test before it damages one)."""
  workdir = tmp_path_factory.mktemp("two_checkpoints") / "run"
  train.train_and_evaluate(tiny_config(), str(workdir))
  assert _complete_steps(str(workdir)) == [3, 6]
  return workdir


def _array_file(step_dir):
  """The largest file of a checkpoint's array data."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def _flip_bytes(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _alter_metadata(step_dir):
  path = os.path.join(step_dir, "meta", "metadata")
  text = open(path).read()
  open(path, "w").write(text.replace('"data_position": 6', '"data_position": 7'))
  return path


def _truncate(step_dir):
  path = _array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _delete(step_dir):
  path = os.path.join(step_dir, "state", "_METADATA")
  os.remove(path)
  return path


def _flip_array_bytes(step_dir):
  path = _array_file(step_dir)
  _flip_bytes(path)
  return path


def _values_differ_without_manifest(step_dir):
  """Values that decode but differ from those saved, in a checkpoint whose file manifest was never
  written (a run killed between orbax finishing and the manifest): the array hashes in its JSON
  record catch it. (Flipped bytes in orbax's files mostly fail to decode; changing the recorded hash
  of one array makes a decodable mismatch every time.)"""
  os.remove(os.path.join(step_dir, "integrity.json"))
  path = os.path.join(step_dir, "meta", "metadata")
  meta = json.loads(open(path).read())
  name = "params/embed/embedding"
  meta["integrity"]["arrays"][name] = "0" * 64
  open(path, "w").write(json.dumps(meta))
  return name


@pytest.mark.parametrize("damage", [_flip_array_bytes, _alter_metadata, _truncate, _delete,
                                    _values_differ_without_manifest])
def test_checkpoint_damaged_in_place_is_set_aside(two_checkpoints, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  step_dir = str(workdir / "checkpoints" / "6")
  damaged = damage(step_dir)
  ckpt = train.Checkpointer(str(workdir), keep=3, save_every=3)
  restored = ckpt.restore_latest(None)
  ckpt.close()
  assert restored is not None and restored[0] == 3
  [aside] = ckpt.set_aside
  assert aside.step == 6 and os.path.isdir(aside.path)
  assert os.path.dirname(aside.path) == str(workdir / "checkpoints_unreadable")
  # The warning names the file, or the array whose values changed.
  if damage is _values_differ_without_manifest:
    assert f"array '{damaged}'" in aside.reason, aside.reason
  elif damage is not _truncate or "file" in aside.reason:
    assert os.path.relpath(damaged, step_dir) in aside.reason, aside.reason


def test_an_intact_checkpoint_verifies(two_checkpoints, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  ckpt = train.Checkpointer(str(workdir), keep=3, save_every=3)
  step, _, meta = ckpt.restore_latest(None)
  ckpt.close()
  assert step == 6 and not ckpt.set_aside and meta["integrity"]["arrays"]
  assert os.path.exists(workdir / "checkpoints" / "6" / "integrity.json")


def test_every_checkpoint_unreadable_stops_until_restart_is_asked_for(two_checkpoints, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  for step in (3, 6):
    _flip_array_bytes(str(workdir / "checkpoints" / str(step)))
  with pytest.raises(train.CheckpointsUnreadable, match="--restart") as err:
    train.train_and_evaluate(tiny_config(), str(workdir))
  assert "step 6" in str(err.value) and "step 3" in str(err.value)
  assert "checkpoints_unreadable" in str(err.value)
  assert len(os.listdir(workdir / "checkpoints_unreadable")) == 2
  metrics = train.train_and_evaluate(tiny_config(), str(workdir), restart=True)
  assert np.isfinite(metrics["loss"]) and _complete_steps(str(workdir)) == [3, 6]


# ------------------------------------------------------------------------------------------------
# One run per workdir.

def _env(**extra):
  return dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
              JAX_PLATFORMS="cpu", **extra)


def _single_line_error(proc):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0, proc.stderr
  assert len(lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  return lines[0]


def test_a_second_run_on_a_held_workdir_stops_with_one_line(tmp_path):
  workdir = tmp_path / "run"
  holder = train.WorkdirLock(str(workdir))
  holder.acquire()  # this test process is the first run
  try:
    proc = subprocess.run([sys.executable, "-m", "ssm_lab.train", "--config=configs/quickstart.py",
                           f"--workdir={workdir}"], cwd=_REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
  finally:
    holder.release()
  line = _single_line_error(proc)
  assert f"pid {os.getpid()}" in line and "in use" in line, line
  assert not (workdir / "checkpoints").exists() and not (workdir / "lock").exists()


def test_a_stale_lock_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  dead = subprocess.Popen(["true"])
  dead.wait()
  import socket
  (workdir / "lock").write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}}}')
  metrics = train.train_and_evaluate(tiny_config(steps=2, checkpoint_every=2), str(workdir))
  assert np.isfinite(metrics["loss"]) and _complete_steps(str(workdir)) == [2]
  assert not (workdir / "lock").exists()  # released on exit


# ------------------------------------------------------------------------------------------------
# Divergence, and the way back.

def test_divergence_keeps_the_last_good_checkpoint_and_a_lower_lr_resumes(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  good = dict(steps=12, checkpoint_every=2, max_bad_steps=3, log_every=1)
  train.train_and_evaluate(tiny_config(**good), workdir, stop_at=4)
  assert _complete_steps(workdir) == [2, 4]
  huge = tiny_config(**good, learning_rate=1e30, grad_clip_norm=1e30)
  with pytest.raises(FloatingPointError, match="resumes from step 4") as err:
    train.train_and_evaluate(huge, workdir)
  assert "--config.train.learning_rate=" in str(err.value)
  assert _complete_steps(workdir) == [2, 4]  # no diverged state was written
  capsys.readouterr()
  metrics = train.train_and_evaluate(tiny_config(**good, learning_rate=5e-4), workdir)
  out = capsys.readouterr().out
  assert "resumed from step 4" in out and "train.learning_rate 1e+30 -> 0.0005" in out, out
  assert np.isfinite(metrics["loss"]) and _complete_steps(workdir)[-1] == 12
  with open(os.path.join(workdir, "config.json")) as f:
    assert '"learning_rate": 0.0005' in f.read()
  step, params = _latest_params(workdir)
  assert step == 12 and max(float(np.abs(x).max()) for x in jax.tree.leaves(params)) < 100


# ------------------------------------------------------------------------------------------------
# Errors a user reads: one line naming the field or file, a non-zero exit.

@pytest.mark.parametrize("override,field", [
    ("--config.train.batch_size=0", "config.train.batch_size"),
    ("--config.model.pattern=MQ", "config.model.pattern"),
    ("--config.train.learning_rate=-0.1", "config.train.learning_rate"),
])
def test_train_config_errors_are_one_line(tmp_path, override, field):
  proc = subprocess.run([sys.executable, "-m", "ssm_lab.train", "--config=configs/quickstart.py",
                         f"--workdir={tmp_path / 'run'}", override], cwd=_REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert field in _single_line_error(proc)


def test_missing_config_file_is_one_line_and_verbose_shows_the_traceback(tmp_path):
  cmd = [sys.executable, "-m", "ssm_lab.train", "--config=configs/no_such.py",
         f"--workdir={tmp_path / 'run'}"]
  proc = subprocess.run(cmd, cwd=_REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert "configs/no_such.py" in _single_line_error(proc)
  proc = subprocess.run(cmd + ["--verbose"], cwd=_REPO, env=_env(), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_generate_errors_are_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ssm_lab.generate", f"--workdir={tmp_path}",
                         "--prompt=1,2"], cwd=_REPO, env=_env(), capture_output=True, text=True,
                        timeout=120)
  assert str(tmp_path) in _single_line_error(proc)


def test_prepare_names_an_undecodable_jsonl_file(tmp_path):
  data = tmp_path / "data" / "broken"
  data.mkdir(parents=True)
  (data / "train.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe bad"}\n')
  proc = subprocess.run([sys.executable, "-m", "ssm_lab.data", "prepare", "broken",
                         f"--data_dir={tmp_path / 'data'}", f"--cache_dir={tmp_path / 'cache'}"],
                        cwd=_REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert "train.jsonl" in _single_line_error(proc)
  # The failed build left no temporary folder behind.
  assert not glob.glob(str(tmp_path / "cache" / "**" / "*.tmp-*"), recursive=True)


def test_from_pretrained_names_a_non_json_config(tmp_path):
  from ssm_lab.models import from_pretrained
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json: not valid JSON"):
    from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Memory: checked before anything runs.

def test_a_step_that_cannot_fit_stops_before_running(tmp_path, monkeypatch):
  monkeypatch.setenv(train.MEMORY_LIMIT_ENV, "0.0001")  # 100 KiB: far below the tiny model's step
  with pytest.raises(train.OutOfMemory, match="config.train.batch_size") as err:
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert "GiB per device" in str(err.value) and train.MEMORY_LIMIT_ENV in str(err.value)
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "train").exists()
  monkeypatch.setenv(train.MEMORY_LIMIT_ENV, "100")
  train.train_and_evaluate(tiny_config(steps=1, checkpoint_every=1), str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Small things.

def test_rerunning_a_finished_run_reports_its_metrics_and_adds_no_event_files(two_checkpoints,
                                                                              tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  before = {d: sorted(os.listdir(workdir / d)) for d in ("train", "eval")}
  metrics = train.train_and_evaluate(tiny_config(), str(workdir))
  assert set(metrics) >= {"loss", "accuracy"} and np.isfinite(metrics["loss"])
  assert {d: sorted(os.listdir(workdir / d)) for d in ("train", "eval")} == before


def test_stale_token_cache_temporaries_are_removed(tmp_path):
  from ssm_lab.data import token_cache
  out = tmp_path / "cache" / "train"
  out.parent.mkdir(parents=True)
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = out.with_name(f"train.tmp-{dead.pid}")
  stale.mkdir()
  (stale / "tokens.bin").write_bytes(b"\0" * 10)
  token_cache.remove_stale_tmp(out)
  assert not stale.exists()
