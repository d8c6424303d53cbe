"""Several GPUs of one host (written for nvidia-h200-x2): dp/FSDP parity, two processes, scaling.

Three parts, each writing into --out (multi_gpu.json, multi_gpu.md; the table is printed last):

  parity       one process, every local GPU: the training loop on MQAR in float32 on 1 GPU, then dp
               and fsdp over all of them, same global batches; the per-step losses must agree
               (relative 1e-3: only the order of the gradient reductions differs).
  processes    `python -m ssm_lab.train` as one process per GPU (jax.distributed, coordinator on
               127.0.0.1, JAX_LOCAL_DEVICE_IDS picks each process's GPU), FSDP. Process 1 gets
               SIGTERM once the first checkpoint exists: both must checkpoint at the same step (JAX's
               preemption sync) and exit 0; a second pair resumes to the end. Its losses must match
               the single-GPU run's.
  scaling      train-step throughput of the ~350M Transformer and Mamba (benchmarks/
               train_throughput.py's cases, bf16, length 2048) on 1 GPU and with dp and fsdp over
               all GPUs at the same batch per GPU (weak scaling): tokens/s, scaling efficiency,
               MFU, peak memory per GPU. The six runs first compile at once into a persistent
               compilation cache (as in train_throughput.py), then run one at a time from it.

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are set for every child), as the
device notes require. A CPU dry run of the whole flow: `--cpu_devices 2` (simulated devices, toy
sizes). On the device machine, ml-collections must travel as a wheel (see train_throughput.py).

  python -m benchmarks.multi_gpu --out $OUT
  python -m benchmarks.multi_gpu --cpu_devices 2 --out /tmp/multi_gpu   # dry run on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ssm_lab.provenance import git_commit  # noqa: E402

# Keep NVLink multicast off everywhere (a program that uses it can take a shared host's GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def _env(extra: dict[str, str] | None = None, cpu_devices: int = 0) -> dict[str, str]:
  env = dict(os.environ, PYTHONUNBUFFERED="1", **SAFE_ENV)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if cpu_devices:
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={cpu_devices}")
  env.update(extra or {})
  return env


def _ckpt_every(small: bool) -> int:
  return 20 if small else 50


def _overrides(small: bool) -> list[str]:
  """Command-line overrides of configs/quickstart.py for the parity and process runs."""
  steps = 40 if small else 1000  # long enough on a GPU for SIGTERM to land mid-run
  return [f"--config.train.num_steps={steps}", "--config.train.log_every=1",
          f"--config.train.eval_every={steps}",
          f"--config.train.checkpoint_every={_ckpt_every(small)}",
          "--config.train.progress_bar=False", "--config.train.warmup_steps=10",
          "--config.train.batch_size=64"] + ([] if small else ["--config.model.d_model=256"])


def _losses(logdir: str) -> dict[int, float]:
  from ssm_lab.metrics import read_scalars  # noqa: PLC0415
  return dict(read_scalars(logdir)["loss"])


def part_parity(work: str, a: argparse.Namespace) -> dict[str, Any]:
  """Runs the parity child (this file with --_parity) and compares its three loss curves."""
  n = a.cpu_devices or 0
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_parity", work]
                        + (["--small"] if a.cpu_devices else []), env=_env(cpu_devices=n),
                        capture_output=True, text=True, timeout=a.part_timeout_s)
  if proc.returncode:
    return {"error": "parity child failed: " + " / ".join(proc.stderr.strip().splitlines()[-3:])}
  ref = _losses(os.path.join(work, "parity_one", "train"))
  out: dict[str, Any] = {"steps": len(ref), "devices": json.loads(proc.stdout.splitlines()[-1])}
  for name in ("dp", "fsdp"):
    got = _losses(os.path.join(work, f"parity_{name}", "train"))
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    out[f"{name}_max_rel_loss_diff"] = worst
    out[f"{name}_ok"] = bool(worst < 1e-3 and len(got) == len(ref))
  return out


def _parity_child(work: str, small: bool) -> None:
  """In one process: the same config on 1 device, dp over all, fsdp over all."""
  import jax  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415,F401  (fails early without the wheel)

  from ssm_lab import parallel, train  # noqa: PLC0415
  from ssm_lab.config import load_config  # noqa: PLC0415
  for name, devices, par in (("one", 1, "dp"), ("dp", None, "dp"), ("fsdp", None, "fsdp")):
    config = load_config(os.path.join(REPO, "configs", "quickstart.py"))
    for flag in _overrides(small):
      key, value = flag[len("--config."):].split("=")
      group, field = key.split(".")
      config[group][field] = type(config[group][field])(
          value if value not in ("False", "True") else value == "True")
    config.train.parallelism = par
    mesh = parallel.make_mesh(jax.devices()[:devices] if devices else None)
    train.train_and_evaluate(config, os.path.join(work, f"parity_{name}"), mesh=mesh)
  print(json.dumps(jax.device_count()))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pair(workdir: str, a: argparse.Namespace, sigterm_at: str | None) -> list[tuple[int, str]]:
  """Starts `python -m ssm_lab.train` as 2 processes (one GPU each); returns (rc, output) each."""
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    extra = {"JAX_LOCAL_DEVICE_IDS": str(i)} if not a.cpu_devices else {}
    log = open(os.path.join(workdir + f".p{i}.log"), "a+")
    cmd = [sys.executable, "-m", "ssm_lab.train", "--config", "configs/quickstart.py",
           f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}", "--config.train.parallelism=fsdp",
           *_overrides(bool(a.cpu_devices))]
    procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env=_env(extra, cpu_devices=1 if a.cpu_devices else 0)))
    logs.append(log)
  if sigterm_at:
    deadline = time.time() + a.part_timeout_s
    while not os.path.exists(sigterm_at) and time.time() < deadline and procs[1].poll() is None:
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
  out = []
  for proc, log in zip(procs, logs, strict=True):
    try:
      rc = proc.wait(timeout=a.part_timeout_s)
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = -9
    log.seek(0)
    out.append((rc, log.read()))
    log.close()
  return out


def part_processes(work: str, a: argparse.Namespace) -> dict[str, Any]:
  workdir = os.path.join(work, "two_processes")
  first = _pair(workdir, a, os.path.join(workdir, "checkpoints",
                                         str(_ckpt_every(bool(a.cpu_devices)))))
  said = [[ln for ln in text.splitlines() if ln.startswith("SIGTERM: checkpointed step")]
          for _, text in first]
  result: dict[str, Any] = {"first_rcs": [rc for rc, _ in first], "sigterm_lines": said}
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  result["checkpoints_after_sigterm"] = steps
  shutil.move(os.path.join(workdir, "train"), os.path.join(workdir, "train_first"))
  second = _pair(workdir, a, None)
  result["second_rcs"] = [rc for rc, _ in second]
  ref = _losses(os.path.join(work, "parity_one", "train"))
  got = _losses(os.path.join(workdir, "train"))
  result["resumed_steps"] = [min(got), max(got)] if got else []
  result["max_rel_loss_diff_vs_one_gpu"] = max(
      (abs(got[s] - ref[s]) / abs(ref[s]) for s in got if s in ref), default=None)
  result["ok"] = bool(result["first_rcs"] == [0, 0] and result["second_rcs"] == [0, 0]
                      and result["max_rel_loss_diff_vs_one_gpu"] is not None
                      and result["max_rel_loss_diff_vs_one_gpu"] < 1e-3)
  if not result["ok"]:
    result["log_tails"] = [text[-1500:] for _, text in first + second]
  return result


def part_scaling(work: str, a: argparse.Namespace, n_devices: int) -> dict[str, Any]:
  del work
  preset = "tiny" if a.cpu_devices else "default"
  cases = ("transformer-tiny", "mamba-tiny") if a.cpu_devices else ("transformer-350m",
                                                                    "mamba-350m")
  seq = "64" if a.cpu_devices else "2048"
  runs = [(case, devices, par) for case in cases
          for devices, par in ((1, "dp"), (n_devices, "dp"), (n_devices, "fsdp"))]

  def cmd(case, devices, par, compile_only=False):
    return ([sys.executable, os.path.abspath(__file__), "--_scaling", case, "--preset", preset,
             "--seq_len", seq, "--devices", str(devices), "--parallelism", par]
            + (["--_compile_only"] if compile_only else []))

  # As in train_throughput.py: compile every run at once into a persistent compilation cache (a
  # 350M train step took 138 s to compile on one H100; six of them in series would fill the call),
  # then time them one at a time from the cache.
  from benchmarks import train_throughput as tt  # noqa: PLC0415
  env = _env(tt.cache_env(tempfile.mkdtemp(prefix="multi_gpu_cache_")), cpu_devices=a.cpu_devices)
  precompile = tt.precompile({"/".join(map(str, run)): cmd(*run, compile_only=True)
                              for run in runs}, env, a.precompile_timeout_s)
  rows = []
  for case, devices, par in runs:
      try:
        proc = subprocess.run(cmd(case, devices, par), env=env, capture_output=True,
                              text=True, timeout=a.part_timeout_s)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASE_RESULT ")]
        row = (json.loads(found[-1].split(" ", 1)[1]) if found else
               {"case": case, "devices": devices, "parallelism": par,
                "error": " / ".join(proc.stderr.strip().splitlines()[-3:])})
      except subprocess.TimeoutExpired:
        row = {"case": case, "devices": devices, "parallelism": par, "error": "timed out"}
      rows.append(row)
      print(json.dumps(row), flush=True)
  for row in rows:
    base = next((r for r in rows if r["case"] == row["case"] and r["devices"] == 1
                 and "error" not in r), None)
    if base and "error" not in row:
      row["scaling_efficiency"] = round(
          row["tokens_per_s"] / (base["tokens_per_s"] * row["devices"]), 3)
  return {"rows": rows, "precompile": precompile}


def _markdown(meta: dict, results: dict) -> str:
  lines = [f"# Multi-GPU training ({meta['devices']} x {meta['device']})", "",
           f"Date {meta['date']}, commit {meta['commit']}, jax {meta['jax']}.", ""]
  par = results.get("parity", {})
  lines.append(f"- parity (MQAR, float32, {par.get('steps')} steps): dp max relative loss diff "
               f"{par.get('dp_max_rel_loss_diff')}, fsdp {par.get('fsdp_max_rel_loss_diff')} "
               f"(ok: dp {par.get('dp_ok')}, fsdp {par.get('fsdp_ok')}) {par.get('error', '')}")
  pro = results.get("processes", {})
  lines.append(f"- two processes, fsdp: SIGTERM lines {pro.get('sigterm_lines')}, checkpoints "
               f"{pro.get('checkpoints_after_sigterm')}, resumed steps {pro.get('resumed_steps')}, "
               f"max relative loss diff vs 1 GPU {pro.get('max_rel_loss_diff_vs_one_gpu')} "
               f"(ok: {pro.get('ok')})")
  lines += ["", "| case | devices | state | global batch | step ms | tokens/s | scaling eff. | "
            "MFU (989) | peak mem GiB/GPU |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in results.get("scaling", {}).get("rows", []):
    if "error" in r:
      lines.append(f"| {r['case']} | {r['devices']} | {r['parallelism']} | failed: "
                   f"{r['error'][:120]} | | | | | |")
      continue
    lines.append(f"| {r['case']} | {r['devices']} | {r['parallelism']} | {r['batch']} | "
                 f"{r['step_ms']} | {r['tokens_per_s']:,} | {r.get('scaling_efficiency', '')} | "
                 f"{100 * r['mfu_datasheet']:.1f}% | {r['peak_memory_gib']} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "benchmarks",
                                                                        "results"))
  p.add_argument("--parts", default="parity,processes,scaling")
  p.add_argument("--cpu_devices", type=int, default=0, help="dry run on N simulated CPU devices")
  p.add_argument("--part_timeout_s", type=float, default=240)
  p.add_argument("--precompile_timeout_s", type=float, default=200,
                 help="scaling: limit of the parallel compile into the persistent cache")
  p.add_argument("--commit", default="")
  # Child modes.
  p.add_argument("--_parity", default="", help=argparse.SUPPRESS)
  p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--_scaling", default="", help=argparse.SUPPRESS)
  p.add_argument("--preset", default="default", help=argparse.SUPPRESS)
  p.add_argument("--seq_len", type=int, default=2048, help=argparse.SUPPRESS)
  p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--parallelism", default="dp", help=argparse.SUPPRESS)
  p.add_argument("--_compile_only", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()

  if a._parity:
    _parity_child(a._parity, a.small)
    return
  if a._scaling:
    from benchmarks import train_throughput as tt  # noqa: PLC0415
    table = tt.TINY if a.preset == "tiny" else tt.CASES
    record = tt.run_case(a._scaling, table[a._scaling], a.seq_len, steps=5, rounds=3,
                         devices=a.devices, parallelism=a.parallelism,
                         compile_only=a._compile_only)
    print("CASE_RESULT " + json.dumps(record), flush=True)
    return

  probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices(); print(jax.__version__,"
                          " '|', d[0].device_kind, '|', len(d))"], capture_output=True, text=True,
                         env=_env(cpu_devices=a.cpu_devices))
  version, device, count = [s.strip() for s in (probe.stdout.strip() or "? | ? | 0").split("|")]
  commit = git_commit(a.commit)
  meta = {"device": device, "devices": int(count), "jax": version, "commit": commit,
          "date": datetime.date.today().isoformat(), "cpu_dry_run": bool(a.cpu_devices)}
  if meta["devices"] < 2:
    raise SystemExit(f"multi_gpu.py needs at least 2 devices, found {count} ({device}); "
                     f"use --cpu_devices 2 for a dry run")
  os.makedirs(a.out, exist_ok=True)
  work = tempfile.mkdtemp(prefix="multi_gpu_")
  results: dict[str, Any] = {}
  parts = a.parts.split(",")
  for part in ("parity", "processes", "scaling"):
    if part not in parts:
      continue
    t0 = time.time()
    try:
      if part == "parity":
        results[part] = part_parity(work, a)
      elif part == "processes":
        results[part] = part_processes(work, a)
      else:
        results[part] = part_scaling(work, a, meta["devices"])
    except Exception as err:  # one broken part must not lose the others' results
      results[part] = {"error": f"{type(err).__name__}: {err}"}
    results[part]["wall_s"] = round(time.time() - t0, 1)
    with open(os.path.join(a.out, "multi_gpu.json"), "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=1)
  md = _markdown(meta, results)
  with open(os.path.join(a.out, "multi_gpu.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
