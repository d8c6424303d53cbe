"""The GPU benchmark scripts' CPU dry runs: each script runs end to end at tiny shapes and writes its
results, so a broken import or argument path is found here rather than in a device call (on
2026-11-23 one device run of benchmarks/selective_scan.py lost its associative and Pallas rows to an
import that only the full script exercises).

The fast ones run by default; the interpret-mode kernel scripts take minutes on 2 cores and are
marked slow (`.ci/run nightly` runs them).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_cmd(script: str) -> list[str]:
  """`python -m benchmarks.<script>` (run from the repository root, as the scripts' docstrings say)."""
  return [sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}"]


def _bench(name: str):
  """benchmarks/<name>.py as the module benchmarks.<name>, the package loaded by path (no sys.path
  change; the installed ssm_lab is what the scripts import)."""
  if "benchmarks" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "benchmarks", ROOT / "benchmarks" / "__init__.py",
        submodule_search_locations=[str(ROOT / "benchmarks")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = pkg
    spec.loader.exec_module(pkg)
  return importlib.import_module(f"benchmarks.{name}")


def _run(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  proc = subprocess.run([*_module_cmd(script), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
  assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-3000:])
  return proc


def test_train_throughput_tiny_with_precompile(tmp_path):
  """Every case compiles into the persistent cache first; the timed process then loads it."""
  _run("train_throughput.py", "--preset", "tiny", "--out", str(tmp_path), "--seq_len", "32",
       "--steps", "1", "--rounds", "1", "--cases", "mamba-tiny,mamba2-tiny",
       "--cache_dir", str(tmp_path / "cache"))
  res = json.loads((tmp_path / "train_throughput.json").read_text())
  assert [r["case"] for r in res["results"]] == ["mamba-tiny", "mamba2-tiny"]
  assert all("error" not in r and r["finite"] and r["tokens_per_s"] > 0 for r in res["results"])
  pre = res["meta"]["precompile"]
  assert all(isinstance(pre[c], float) for c in ("mamba-tiny", "mamba2-tiny")), pre
  assert any((tmp_path / "cache").iterdir())
  assert "compiled at once" in (tmp_path / "train_throughput.md").read_text()


# One `jla train` metrics.jsonl, recorded from a CPU run of jax-linear-attention 0.1.0 (tiny-mamba2,
# batch 2 x 32, log_every 2): a warm-up window, then two timed ones (fields trimmed to those read).
_JLA_METRICS = "\n".join(json.dumps(e) for e in [
    {"event": "start", "metrics": {}, "step": 0},
    {"event": "train", "step": 2, "metrics": {"loss": 6.26, "step_time": 4.19, "mfu_percent": 0.0,
     "tokens_per_sec_per_device": 15.3, "model_tflops_per_sec_per_device": 9.6e-6}},
    {"event": "telemetry", "step": 3, "metrics": {"telemetry/skipped_steps_total": 0}},
    {"event": "train", "step": 4, "metrics": {"loss": 6.25, "step_time": 0.0090, "mfu_percent": 1.5,
     "tokens_per_sec_per_device": 7111.0, "model_tflops_per_sec_per_device": 4.478e-3}},
    {"event": "train", "step": 6, "metrics": {"loss": 6.24, "step_time": 0.0080, "mfu_percent": 2.5,
     "tokens_per_sec_per_device": 8000.0, "model_tflops_per_sec_per_device": 5.038e-3}},
    {"event": "end", "metrics": {"stop_reason": "max_steps"}, "step": 6}])


def test_jla_command_and_metrics_parsing():
  """The `jla train` path without jla: the experiment file it is given and how its log is read."""
  import tomllib  # noqa: PLC0415

  tt = _bench("train_throughput")
  cfg = tomllib.loads(tt.jla_config("mamba2-130m", batch=16, seq_len=2048, steps=5, rounds=3,
                                    output_dir="/tmp/x"))
  assert cfg["model"] == {"preset": "mamba2-130m", "remat": "none", "compute_dtype": "bfloat16"}
  assert cfg["train"]["micro_batch_per_replica"] == 16 and cfg["train"]["seq_len"] == 2048
  assert cfg["train"]["max_steps"] == 20 and cfg["train"]["log_every"] == 5   # warm-up + 3 windows
  assert not cfg["train"]["final_eval"] and cfg["data"]["source"] == "synthetic"
  assert tt.jla_cmd("/tmp/e.toml")[1:] == ["-m", "jla.cli", "train", "--config", "/tmp/e.toml"]
  rec = tt.parse_jla_metrics(_JLA_METRICS, batch=2, seq_len=32)
  assert rec["step_ms_rounds"] == [9.0, 8.0]            # the warm-up window is dropped
  assert rec["step_ms"] == 9.0 and rec["tokens_per_s"] == 7111   # median of two: the upper one
  assert rec["mfu_jla_percent"] == 2.5 and rec["finite"]
  assert abs(rec["jla_flops_per_token"] - 629750.0) < 1.0
  with pytest.raises(ValueError):
    tt.parse_jla_metrics(_JLA_METRICS.split("\n", 2)[0], batch=2, seq_len=32)
  assert set(tt.JLA_PRESETS) <= set(tt.CASES) and set(tt.JLA_TINY) <= set(tt.TINY)


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import jla.cli, equinox"],
                                   capture_output=True).returncode != 0,
                    reason="jax-linear-attention (and equinox) not installed")
def test_train_throughput_tiny_with_jla(tmp_path):
  """The whole side-by-side flow on CPU: our tiny case, then `jla train` on its tiny preset."""
  _run("train_throughput.py", "--preset", "tiny", "--out", str(tmp_path), "--seq_len", "32",
       "--steps", "2", "--rounds", "2", "--cases", "mamba2-tiny", "--precompile", "off", "--jla", "on")
  res = json.loads((tmp_path / "train_throughput.json").read_text())
  assert [r["jla_preset"] for r in res["jla"]] == ["tiny-mamba2"]
  assert "error" not in res["jla"][0] and res["jla"][0]["tokens_per_s"] > 0
  assert "jax-linear-attention's trainer" in (tmp_path / "train_throughput.md").read_text()


def test_generation_smoke_and_merge(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _run("generation.py", "--smoke", "--out", str(a), "--models", "mamba-tiny,transformer-tiny",
       "--decode_models", "mamba-tiny", "--budget_s", "600")
  _run("generation.py", "--smoke", "--out", str(b), "--models", "transformer-tiny",
       "--budget_s", "600")
  ra = json.loads((a / "generation.json").read_text())
  assert {r["model"] for r in ra["decode"]} == {"mamba-tiny"}       # --decode_models
  assert {r["model"] for r in ra["context_memory"]} == {"mamba-tiny", "transformer-tiny"}
  _run("generation.py", "--out", str(tmp_path / "m"), "--merge", str(a / "generation.json"),
       str(b / "generation.json"))
  m = json.loads((tmp_path / "m" / "generation.json").read_text())
  measured = {(r["model"], r["batch"]) for r in m["decode"] if "tokens_per_s" in r}
  assert measured == {(n, bt) for n in ("mamba-tiny", "transformer-tiny") for bt in (1, 2)}
  assert {(r["model"], r["batch"]) for r in m["ratios"]} == {("mamba-tiny", 1), ("mamba-tiny", 2)}
  assert "Merged from several device calls" in (tmp_path / "m" / "generation.md").read_text()


@pytest.mark.slow
def test_selective_scan_smoke(tmp_path):
  _run("selective_scan.py", "--smoke", "--out", str(tmp_path), "--budget-s", "600")
  res = json.loads((tmp_path / "selective_scan.json").read_text())
  assert res["checks"] and all(c["ok"] for c in res["checks"]), res["checks"]
  timed = {(r["impl"], r["mode"]) for r in res["bench"] if "ms" in r}
  assert {("associative", "fwdbwd"), ("pallas", "fwdbwd")} <= timed
  piped = {(r["impl"], r["mode"]) for r in res["bench"] if "pipelined_ms" in r}
  assert {("associative", "fwdbwd"), ("pallas", "fwdbwd")} <= piped


@pytest.mark.slow
def test_selective_scan_impls_and_sweep_match(tmp_path):
  _run("selective_scan.py", "--smoke", "--out", str(tmp_path), "--budget-s", "600", "--no-jla",
       "--impls", "pallas", "--sweep", "--sweep-match", '"kernels": "v4"', "--no-shape-checks")
  res = json.loads((tmp_path / "selective_scan.json").read_text())
  assert {r["impl"] for r in res["bench"]} == {"pallas"}
  assert res["sweep"] and all(r["config"].get("kernels") == "v4" for r in res["sweep"])
  assert all("pipelined_ms" in r for r in res["sweep"] if "ms" in r)


@pytest.mark.slow
def test_ssd_smoke(tmp_path):
  _run("ssd.py", "--smoke", "--out", str(tmp_path), "--commit", "test", "--rounds", "2")
  md = (tmp_path / "ssd.md").read_text()
  assert "| chunked |" in md and "| pallas |" in md
  assert "Ratios (fwd+bwd, pipelined)" in md
  rows = json.loads((tmp_path / "ssd.json").read_text())["results"]
  assert all("fwdbwd_pipe_ms" in r for r in rows if "error" not in r)


def test_timing_pipelined_waits_for_every_call():
  import jax.numpy as jnp  # noqa: PLC0415
  from ssm_lab import timing  # noqa: PLC0415
  calls = []

  def exe(x):
    calls.append(x)
    return jnp.asarray(x) + 1

  ms = timing.pipelined(exe, (1,), reps=5)
  assert ms >= 0 and len(calls) == 6                  # one warm-up call, then the five timed
  med, lo = timing.synchronised(exe, (1,), reps=3, warmup=1)
  assert 0 <= lo <= med and len(calls) == 10


@pytest.mark.slow
def test_layer_breakdown_smoke(tmp_path):
  _run("layer_breakdown.py", "--smoke", "--out", str(tmp_path), "--workers", "2")
  assert any(p.suffix == ".json" for p in tmp_path.iterdir())
  md = next(p for p in tmp_path.iterdir() if p.suffix == ".md").read_text()
  assert "conv" in md and "layer" in md


def test_ceilings_follow_the_device_that_ran():
  ceilings = _bench("ceilings")

  assert ceilings.for_device("NVIDIA H100 80GB HBM3") == ceilings.H100
  assert ceilings.for_device("NVIDIA H200") == ceilings.H200
  assert ceilings.H200.hbm_tb_s > ceilings.H100.hbm_tb_s
  cpu = ceilings.for_device("cpu")
  assert (cpu.hbm_tb_s, cpu.matmul_tf_s) == (ceilings.H100.hbm_tb_s, ceilings.H100.matmul_tf_s)
  assert "assumed" in cpu.source


def test_profile_kernels_runs_each_op_on_cpu():
  # The script ncu wraps: without a GPU it still builds, warms up and runs the one profiled call.
  out = _run("profile_kernels.py", "--op", "scan", "--shape", "1x32x16x4", "--config",
             '{"chunk": 8}').stdout
  assert "profiled 1 call(s): scan fwdbwd (1, 32, 16, 4)" in out and "profiler API absent" in out
  out = _run("profile_kernels.py", "--op", "ssd", "--shape", "1x64x2x16x16", "--mode", "fwd").stdout
  assert "profiled 1 call(s): ssd fwd (1, 64, 2, 16, 16)" in out


def test_profile_kernels_rejects_a_bad_shape_or_config():
  for args, msg in ((("--op", "ssd", "--shape", "1x64x2"), "--shape '1x64x2': ssd needs 5 sizes"),
                    (("--op", "scan", "--shape", "1x8x8x4", "--config", "{chunk"),
                     "--config is not JSON")):
    proc = subprocess.run([*_module_cmd("profile_kernels.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode != 0 and msg in proc.stderr, proc.stderr[-500:]


def test_ncu_summary_tables_details_and_sass_pages(tmp_path):
  # Fixtures in the two ncu CSV layouts the profile script writes (--page details, --page source).
  hdr = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
         '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
         '"Metric Value"')
  rows = [("Duration", "us", "12.5"), ("Registers Per Thread", "register/thread", "255"),
          ("Grid Size", "", "8"), ("Block Size", "", "128"),
          ("Executed Instructions", "inst", "1,000")]
  (tmp_path / "run_a.csv").write_text("==PROF== Connected\n" + hdr + "\n" + "".join(
      f'"0","1","python3","h","my_kernel","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0",'
      f'"Sec","{m}","{u}","{v}"\n' for m, u, v in rows))
  sass_hdr = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
              '"stall_wait","stall_short_sb"')
  (tmp_path / "run_a_sass.csv").write_text(
      '"Kernel Name","my_kernel",\n' + sass_hdr + "\n"
      '"0x0","SHFL.BFLY PT, R1, R2, 0x1, 0x1f","30","300","10","20"\n'
      '"0x10","@P0 FADD R1, R1, R2","10","100","10","0"\n')
  md = _run("ncu_summary.py", str(tmp_path), "--title", "T").stdout
  line = next(l for l in md.splitlines() if l.startswith("| run_a |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[:6] == ["run_a", "my_kernel", "12.5 us", "255", "8", "128"] and cells[9] == "1,000"
  assert "executed instructions by opcode: SHFL 75%, FADD 25%" in md
  stalls = md.split("stall reasons: ")[1].split("\n")[0]
  assert sorted(stalls.split(", ")) == ["short_sb 50%", "wait 50%"]


def test_ncu_ab_medians_and_ratios(tmp_path):
  # Fixtures in ncu_ab.sh's layout: <old|new>_<shape>_<rep>.csv, gpu__time_duration per kernel.
  hdr = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
         '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
         '"Metric Value"')

  def write(name, kernels):
    (tmp_path / f"{name}.csv").write_text("==PROF== Connected\n" + hdr + "\n" + "".join(
        f'"{i}","1","p","h","{k}","1","7","(32, 1, 1)","(8, 1, 1)","0","9.0","",'
        f'"gpu__time_duration.sum","{u}","{v}"\n' for i, (k, u, v) in enumerate(kernels)))

  bwd, xla = "selective_scan_bwd", "loop_fusion"
  write("old_8x64x32x16_1", [(bwd, "usecond", "10"), (xla, "nsecond", "500")])
  write("old_8x64x32x16_2", [(bwd, "usecond", "12"), (xla, "nsecond", "500")])
  write("new_8x64x32x16_1", [(bwd, "msecond", "0.008"), (xla, "usecond", "1")])
  write("new_8x64x32x16_2", [(bwd, "usecond", "8"), (xla, "usecond", "1")])
  md = _run("ncu_ab.py", str(tmp_path), "--json", str(tmp_path / "ab.json")).stdout
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
           if line.startswith("| 8x64x32x16 |")]
  rows = {c[1]: c for c in cells}
  assert rows["bwd"][2:] == ["11.0", "8.0", "0.727"]
  assert rows["xla"][2:] == ["0.5", "1.0", "2.000"]
  assert rows["total"][2:] == ["11.5", "9.0", "0.783"]
  assert json.loads((tmp_path / "ab.json").read_text())["new_8x64x32x16"]["bwd"] == 8.0


def _offline_sass():
  offline_sass = _bench("offline_sass")
  return offline_sass


def _snappy_literals(data: bytes) -> bytes:
  """A valid raw Snappy stream of data in literals of <= 60 bytes, with one back-reference."""
  out = bytearray()
  n = len(data) + 8
  while True:                                           # varint of the uncompressed length
    b, n = n & 0x7F, n >> 7
    out.append(b | (0x80 if n else 0))
    if not n:
      break
  for i in range(0, len(data), 60):
    piece = data[i:i + 60]
    out.append((len(piece) - 1) << 2)
    out += piece
  out += bytes([(8 - 1) << 2 | 2]) + (16).to_bytes(2, "little")   # copy 8 bytes from 16 back
  return bytes(out)


def test_offline_sass_finds_a_snappy_chunk_across_riegeli_block_headers():
  # The layout cubins_of reads: a Riegeli file (first block header at its start, a 24-byte block
  # header every 64 KiB from there) holding a Snappy stream whose first literal starts with the
  # marker. The stream is longer than a block, so the headers cut through it.
  os_ = _offline_sass()
  marker = b"\n\x1axla.gpu.GpuExecutableProto"
  payload = marker + bytes(range(256)) * 700                      # ~179 KB
  stream = _snappy_literals(payload)
  file = bytearray(os_.RIEGELI_FILE_START + b"\x40" + bytes(7) + b"chunk header...." + stream)
  for k in (1, 2, 3):                                             # insert block headers
    at = k * os_.RIEGELI_BLOCK
    if at < len(file):
      file[at:at] = b"\xee" * os_.RIEGELI_BLOCK_HEADER
  data = b"proto prefix" + bytes(file)
  out = os_.riegeli_snappy(data, marker, os_._file_starts(data))
  assert out == payload + payload[-16:-8]
  with pytest.raises(RuntimeError, match="not found"):
    os_.riegeli_snappy(data, b"no such marker", [12])


def test_offline_sass_reads_cuobjdump_and_nvdisasm_output():
  os_ = _offline_sass()
  usage = (" Function selective_scan_bwd:\n  REG:255 STACK:384 SHARED:1024 LOCAL:0 CONSTANT[0]:688 "
           "TEXTURE:0 SURFACE:0 SAMPLER:0\n")
  assert os_.resource_usage(usage) == dict(registers=255, stack_bytes=384, shared_bytes=1024,
                                           local_bytes=0)
  sass = ("        /*0000*/                   LDC R1, c[0x0][0x28] ;\n"
          "        /*0010*/               @!P0 SHFL.BFLY PT, R3, R2, 0x10, 0x1f ;\n"
          "        /*0020*/                   SHFL.BFLY PT, R4, R3, 0x8, 0x1f ;\n"
          "  .L_x_1:\n"
          "        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;\n")
  assert os_.opcode_mix(sass) == {"instructions": 4, "opcodes": {"SHFL": 2, "LDC": 1, "HGMMA": 1}}


def test_compile_deviceless_without_the_cuda_plugin_says_what_is_missing():
  import jax.numpy as jnp  # noqa: PLC0415
  from ssm_lab.ops.pallas import lowering  # noqa: PLC0415
  try:
    import jax_plugins.xla_cuda12  # noqa: F401,PLC0415
    pytest.skip("the CUDA plugin is installed here")
  except ImportError:
    pass
  with pytest.raises(RuntimeError, match="jax-cuda12-plugin"):
    lowering.compile_deviceless(lambda x: x * 2, jnp.ones(4))
  with pytest.raises(ValueError, match="gpu='A100'"):
    lowering.compile_deviceless(lambda x: x, jnp.ones(4), gpu="A100")
