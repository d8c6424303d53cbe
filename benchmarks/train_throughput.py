"""Training throughput on one GPU: tokens/s, MFU and peak memory of `ssm_lab.train.train_step`.

Cases: ~130M and ~350M Transformer (LLaMA-style, SwiGLU), Mamba and Mamba-2 at length 2048, bfloat16
compute with float32 master weights and AdamW state, every op on `impl="auto"` (the fastest impl the
registry has for the backend: cuDNN or Pallas attention, the Pallas scans). The step is the training
loop's own (gradient clipping, AdamW, non-finite skipping), jitted with the loop's shardings on one
device, fed fresh random tokens (never zeros) each step.

Each case runs in its own subprocess so that its peak memory (`peak_bytes_in_use`) is its own and one
failing case (out of memory, a missing layer) costs only itself; the parent stops starting cases when
`--budget_s` would be exceeded. MFU = model FLOPs per token (ssm_lab.models.flops, 3x forward) times
tokens/s over a peak: both the datasheet dense bf16 peak the training loop uses (989 TFLOP/s for an
H100 or H200) and the measured bf16 matmul ceiling of the chip that ran (benchmarks/ceilings.py:
736 TFLOP/s on this workplace's H100, 790 on its H200).

  python -m benchmarks.train_throughput --out benchmarks/results            # all cases
  python -m benchmarks.train_throughput --cases transformer-350m --steps 5
  python -m benchmarks.train_throughput --preset tiny --out /tmp/x          # CPU dry run

Writes train_throughput.json and train_throughput.md under --out and prints the table last.
Needs ssm_lab's dependencies, ml-collections included (ssm_lab.train imports it). The device
machine's image lacks it: carry its wheel (`pip download --no-deps --only-binary=:all: -d .carry/h6
ml_collections==1.1.0`; /.carry/ is git-ignored) and run, with carry [".carry/h6"] and timeout_s 590:

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .carry/h6/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail;
  PYTHONUNBUFFERED=1 python -m benchmarks.train_throughput --out $OUT --budget_s 400 \
      --case_timeout_s 240 --commit <git rev-parse --short HEAD> 2>&1 | tee $OUT/log.txt

Measured on 2026-11-23 (H100, commit 91f8ac3; that train_throughput.md is in git history) with carry
[".carry/snap"] (a `git archive` of HEAD plus the wheel) and `--budget_s 430 --case_timeout_s 150
--precompile_timeout_s 190`: all six cases in 415 s. The parallel precompile took 192 s; four cases
finished it and then loaded their step in 2-7 s instead of compiling it (transformer-350m's compile
alone took 138 s there); the two 48-layer SSM cases (mamba-350m, mamba2-350m) hit its limit and
compiled again in their timed process (~50 s each). An earlier attempt without the cache and with a
90 s case limit lost both cases it started.

After each case, unless `--jla off`, jax-linear-attention's own trainer (`jla train`, PyPI
jax-linear-attention==0.1.0, importable with its dependency equinox) runs its matching preset
(JLA_PRESETS) on the same GPU, length, batch and bf16 compute, and the report puts the two tokens/s
and MFUs side by side. jla runs on a CPU too: `--preset tiny --jla on` is the CPU dry run of that
path. Its throughput is read from the metrics.jsonl it writes (`parse_jla_metrics`); the first log
window is warm-up. The 1.3B cases (transformer-1p3b, mamba2-1p3b) run only when `--cases` names them.

Cases run in the order listed (350M first); --budget_s stops starting new ones. Before that, every
case is compiled at once in parallel processes into a persistent compilation cache
(`--precompile on`, the default; `--precompile_timeout_s`), so the serial timed processes load their
executables instead of compiling them one after another.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ssm_lab.provenance import git_commit  # noqa: E402

from benchmarks import ceilings  # noqa: E402

DATASHEET_PEAK = 989e12  # H100/H200 SXM dense bf16 (what ssm_lab.train.PEAK_FLOPS uses)
VOCAB = 50304            # GPT-NeoX's 50277 tokens padded to a multiple of 128

_COMMON = dict(vocab_size=VOCAB, dtype="bfloat16", param_dtype="float32", tie_embeddings=True,
               remat="none")
CASES: dict[str, dict[str, Any]] = {
    # Transformer++ (LLaMA-style) at GPT-3 small / medium widths.
    "transformer-350m": dict(pattern="A" * 24, d_model=1024,
                             attention=dict(num_heads=16, num_kv_heads=16), block_mlp=True, batch=16),
    "mamba-350m": dict(pattern="M" * 48, d_model=1024, batch=8),
    "transformer-130m": dict(pattern="A" * 12, d_model=768,
                             attention=dict(num_heads=12, num_kv_heads=12), block_mlp=True, batch=16),
    "mamba-130m": dict(pattern="M" * 24, d_model=768, batch=16),
    "mamba2-350m": dict(pattern="S" * 48, d_model=1024, mamba2=dict(d_state=128, head_dim=64),
                        batch=8),
    "mamba2-130m": dict(pattern="S" * 24, d_model=768, mamba2=dict(d_state=128, head_dim=64),
                        batch=16),
    # jla's 1.3B presets (FLA's shapes) matched field by field where ssm_lab has the field: Llama-3.1
    # vocabulary, untied embeddings, GQA 32/8 and a 5632-wide SwiGLU; 48 mixer-only Mamba-2 blocks.
    # Not in the default list (`--cases` names them): each needs minutes of a device call to compile.
    "transformer-1p3b": dict(pattern="A" * 24, d_model=2048, attention=dict(num_heads=32, num_kv_heads=8),
                             block_mlp=True, d_ff=5632, vocab_size=128256, tie_embeddings=False,
                             batch=16),
    "mamba2-1p3b": dict(pattern="S" * 48, d_model=2048, mamba2=dict(d_state=128, head_dim=64),
                        vocab_size=128256, tie_embeddings=False, batch=16),
}
DEFAULT_CASES = [n for n in CASES if not n.endswith("1p3b")]
# jax-linear-attention's preset for each case: `jla train` runs it in the same run, same GPU, length,
# batch and bf16 compute (its own defaults otherwise: float32 params and AdamW moments, its synthetic
# Markov data). Its presets differ from ours in detail (transformer-125m: GQA with 4 KV heads and
# d_ff 2304; ours 12 KV heads, d_ff from ssm_lab.layers.mlp), so tokens/s compare trainers on models
# of about the same size and FLOPs, not bit-identical models; each side's MFU uses its own FLOP count.
JLA_PRESETS = {"transformer-130m": "transformer-125m", "transformer-350m": "transformer-350m",
               "mamba-130m": "mamba1-130m", "mamba2-130m": "mamba2-130m",
               "transformer-1p3b": "transformer-1p3b", "mamba2-1p3b": "mamba2-1p3b"}
JLA_TINY = {"transformer-tiny": "tiny", "mamba-tiny": "tiny-mamba1", "mamba2-tiny": "tiny-mamba2"}
# A CPU dry run of the whole flow (subprocesses, JSON, table) at toy sizes.
TINY = {
    "transformer-tiny": dict(pattern="AA", d_model=64, attention=dict(num_heads=2, num_kv_heads=2),
                             block_mlp=True, batch=2, vocab_size=256),
    "mamba-tiny": dict(pattern="MM", d_model=64, batch=2, vocab_size=256),
    "mamba2-tiny": dict(pattern="SS", d_model=64, mamba2=dict(d_state=16, head_dim=16), batch=2,
                        vocab_size=256),
}


def run_case(name: str, spec: dict[str, Any], seq_len: int, steps: int, rounds: int, *,
             devices: int = 1, parallelism: str = "dp", compile_only: bool = False) -> dict:
  """Compiles and times the train step of one case in this process; returns its record.

  `compile_only`: compile the state initialiser and the train step from abstract values (no device
  buffers) and return the compile time; with a persistent compilation cache configured (see
  `cache_env`) this fills the cache for a later timed run of the same case.

  `spec["batch"]` is the batch per device; with `devices` > 1 the global batch is that times
  `devices`, sharded over a mesh of the first `devices` devices ("dp" or "fsdp" for the state).
  """
  t_case = time.perf_counter()
  import functools  # noqa: PLC0415 (the parent process never imports JAX)
  import math  # noqa: PLC0415
  import types  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from ssm_lab import parallel, train  # noqa: PLC0415
  from ssm_lab.models import build_model, flops_per_token, param_count  # noqa: PLC0415
  from ssm_lab.ops import registry as op_registry  # noqa: PLC0415

  phases: dict[str, float] = {}

  def phase(label: str) -> None:
    # Printed as it happens, so a case killed by --case_timeout_s still says how far it got.
    phases[label] = round(time.perf_counter() - t_case, 1)
    print(f"PHASE {label} {phases[label]}", flush=True)

  phase("imported")
  chosen: dict[str, str] = {}
  resolve = op_registry.OpRegistry.resolve

  def recording_resolve(self, impl, backend=None, **call):
    out = resolve(self, impl, backend, **call)
    chosen[self.op_name] = out.name
    return out
  op_registry.OpRegistry.resolve = recording_resolve

  spec = dict(spec)
  batch = spec.pop("batch") * devices
  model_cfg = {**_COMMON, **spec}
  model = build_model(model_cfg)
  args = model.args
  t = types.SimpleNamespace(learning_rate=3e-4, warmup_steps=10, num_steps=1000, min_lr_ratio=0.1,
                            weight_decay=0.1, b1=0.9, b2=0.95, grad_clip_norm=1.0)
  tx = train.make_optimizer(t, args.pattern)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  rng = np.random.default_rng(0)

  def new_batch():
    tokens = rng.integers(0, args.vocab_size, size=(batch, seq_len + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((batch, seq_len), np.float32)}

  class _Task:
    def train_batch(self, step, batch_size):
      del step, batch_size
      return {"inputs": np.zeros((1, seq_len), np.int32)}

  init = train._state_initializer(_Task(), model, tx)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(abstract, mesh, parallelism)
  param_sh = shardings.params if parallelism == "fsdp" and devices > 1 else None
  phase("model built")
  rows = parallel.batch_sharding(mesh)
  step_fn = jax.jit(functools.partial(train.train_step, model=model, kind="lm", tx=tx, accum=1,
                                      mesh=mesh, param_shardings=param_sh),
                    in_shardings=(shardings, rows),
                    out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  init_fn = jax.jit(init, out_shardings=shardings)
  if compile_only:
    t0 = time.perf_counter()
    init_fn.lower(jax.random.PRNGKey(0)).compile()
    abs_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                          weak_type=getattr(x, "weak_type", False)),
        abstract, shardings)
    abs_batch = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows), new_batch())
    step_fn.lower(abs_state, abs_batch).compile()
    phase("compiled (abstract)")
    return {"case": name, "compile_only_s": round(time.perf_counter() - t0, 1),
            "phases_s": phases}
  state = init_fn(jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  phase("state initialised")
  n_params = param_count(state.params)
  batches = [parallel.shard_batch(new_batch(), mesh) for _ in range(4)]

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  phase("train step compiled")
  mem = compiled.memory_analysis()
  state, metrics = compiled(state, batches[0])
  first = jax.device_get(metrics)
  state, metrics = compiled(state, batches[1])  # second warm-up step
  jax.block_until_ready(state)
  phase("warm-up steps done")
  times = []
  for r in range(rounds):
    t0 = time.perf_counter()
    for s in range(steps):
      state, metrics = compiled(state, batches[(r * steps + s) % len(batches)])
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / steps)
  last = jax.device_get(metrics)
  step_s = float(np.median(times))
  tokens_per_s = batch * seq_len / step_s
  fpt = flops_per_token(args, seq_len)
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat]
  first_loss = float(first["loss_sum"] / first["count"])
  measured_peak = ceilings.for_device(mesh.devices.flat[0].device_kind).matmul_tf_s * 1e12
  return {
      "case": name, "devices": devices, "parallelism": parallelism, "pattern": args.pattern, "d_model": args.d_model, "params": n_params,
      "batch": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len,
      "impls": chosen, "compile_s": round(compile_s, 1),
      "step_ms": round(step_s * 1e3, 2), "step_ms_rounds": [round(x * 1e3, 2) for x in times],
      "tokens_per_s": round(tokens_per_s), "train_flops_per_token": fpt,
      "model_tflops_per_s": round(fpt * tokens_per_s / 1e12, 1),
      "mfu_datasheet": round(fpt * tokens_per_s / (DATASHEET_PEAK * devices), 4),
      "measured_peak_tf_s": measured_peak / 1e12,
      "mfu_measured_peak": round(fpt * tokens_per_s / (measured_peak * devices), 4),
      "peak_memory_gib": round(max(peaks) / 2**30, 2) or None,  # the fullest device
      "compiled_temp_gib": round(mem.temp_size_in_bytes / 2**30, 2) if mem else None,
      # Sanity: random tokens at initialisation give a loss near ln(vocab); the step stayed finite.
      "first_loss": round(first_loss, 4), "ln_vocab": round(math.log(args.vocab_size), 4),
      "finite": bool(last["finite"]) and bool(first["finite"]),
      "last_grad_norm": float(last["grad_norm"]),
      "phases_s": phases,
  }


def jla_available() -> bool:
  """Whether jax-linear-attention's trainer imports here (its `jla` package and equinox)."""
  probe = subprocess.run([sys.executable, "-c", "import jla.cli, equinox"], capture_output=True)
  return probe.returncode == 0


def jla_config(preset: str, *, batch: int, seq_len: int, steps: int, rounds: int,
               output_dir: str) -> str:
  """The TOML experiment file `jla train` reads for one timing run of `preset`.

  One log window of `steps` steps per round plus one leading warm-up window (its first steps
  include the dispatch of the freshly compiled step), so the timed windows match ssm_lab's rounds.
  remat "none" as ssm_lab's cases (jla's default is "full"); evaluation, checkpoints and the
  profiler off, so the run times nothing but training steps.
  """
  return "\n".join([
      'name = "ssm-lab-throughput"',
      "[model]", f'preset = "{preset}"', 'remat = "none"', 'compute_dtype = "bfloat16"',
      "[train]", f"max_steps = {steps * (rounds + 1)}", f"seq_len = {seq_len}",
      f"micro_batch_per_replica = {batch}", f"log_every = {steps}", f'output_dir = "{output_dir}"',
      "final_eval = false", "save_final = false", "save_every = 0", "eval_every = 0",
      "[data]", 'source = "synthetic"', ""])


def jla_cmd(config_path: str) -> list[str]:
  return [sys.executable, "-m", "jla.cli", "train", "--config", config_path]


def parse_jla_metrics(text: str, *, batch: int, seq_len: int) -> dict[str, Any]:
  """Throughput from the `metrics.jsonl` that `jla train` writes in its output_dir.

  Each "train" event is one log window: its `step_time` is the window's mean seconds per step (host
  wall time between metric reads, so device time included), `mfu_percent` jla's MFU (its own model
  FLOPs per token over 989 TFLOP/s on H100/H200, 0 where it knows no peak, e.g. on CPU). The first
  window is warm-up and dropped; the rest give the median, as ssm_lab's rounds do.
  """
  windows = []
  for line in text.splitlines():
    if line.strip():
      event = json.loads(line)
      if event.get("event") == "train":
        windows.append(event["metrics"])
  if len(windows) < 2:
    raise ValueError(f"jla wrote {len(windows)} train windows; need a warm-up window and one timed")
  timed = windows[1:]
  step_s = sorted(w["step_time"] for w in timed)[len(timed) // 2]
  tokens_per_s = batch * seq_len / step_s
  mfu = sorted(w.get("mfu_percent", 0.0) for w in timed)[len(timed) // 2]
  # jla's model FLOPs per token, recovered from its own TFLOP/s and tokens/s of one window.
  w = timed[-1]
  fpt = (w["model_tflops_per_sec_per_device"] * 1e12 / w["tokens_per_sec_per_device"]
         if w.get("tokens_per_sec_per_device") else None)
  return {"step_ms": round(step_s * 1e3, 2), "step_ms_rounds": [round(x["step_time"] * 1e3, 2) for x in timed],
          "tokens_per_s": round(tokens_per_s), "mfu_jla_percent": round(mfu, 2),
          "jla_flops_per_token": fpt, "loss": timed[-1].get("loss"),
          "finite": all(float(x.get("loss", float("nan"))) == float(x.get("loss", float("nan")))
                        for x in timed)}


def run_jla(case: str, preset: str, *, batch: int, seq_len: int, steps: int, rounds: int,
            timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
  """Runs `jla train` on `preset` in a subprocess and returns its record (or why it has none)."""
  t0 = time.time()
  record: dict[str, Any] = {"case": case, "jla_preset": preset, "batch": batch, "seq_len": seq_len}
  with tempfile.TemporaryDirectory(prefix="jla_run_") as tmp:
    out_dir = os.path.join(tmp, "run")
    path = os.path.join(tmp, "experiment.toml")
    with open(path, "w") as f:
      f.write(jla_config(preset, batch=batch, seq_len=seq_len, steps=steps, rounds=rounds,
                         output_dir=out_dir))
    try:
      proc = subprocess.run(jla_cmd(path), capture_output=True, text=True, timeout=timeout_s, env=env)
      metrics = os.path.join(out_dir, "metrics.jsonl")
      if proc.returncode == 0 and os.path.exists(metrics):
        with open(metrics) as f:
          record.update(parse_jla_metrics(f.read(), batch=batch, seq_len=seq_len))
      else:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-3:]
        record["error"] = f"rc {proc.returncode}: " + " / ".join(t[-300:] for t in tail)
    except subprocess.TimeoutExpired:
      record["error"] = f"timed out after {timeout_s:.0f} s"
  record["wall_s"] = round(time.time() - t0, 1)
  return record


def _jla_markdown(records: list[dict], jla: list[dict]) -> list[str]:
  ours = {r["case"]: r for r in records if "error" not in r}
  lines = ["", "## Against jax-linear-attention's trainer (`jla train`, same run, same GPU)", "",
           "Same length, batch and bf16 compute; jla's own preset for each case (see JLA_PRESETS in "
           "benchmarks/train_throughput.py for how the models differ), remat \"none\" on both sides. "
           "Each side's MFU is its own model FLOPs over 989 TFLOP/s; `jla MFU (our FLOPs)` puts jla's "
           "tokens/s under ssm_lab's FLOP count of our case.", "",
           "| case | jla preset | batch x len | ssm_lab tokens/s | jla tokens/s | ssm_lab / jla | "
           "ssm_lab MFU | jla MFU (its FLOPs) | jla MFU (our FLOPs) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for j in jla:
    o = ours.get(j["case"])
    mine = f"{o['tokens_per_s']:,}" if o else "failed"
    if "error" in j:
      lines.append(f"| {j['case']} | {j['jla_preset']} | {j['batch']}x{j['seq_len']} | {mine} | "
                   f"failed: {j['error'][:160]} | | | | |")
      continue
    ratio = f"{o['tokens_per_s'] / j['tokens_per_s']:.2f}" if o else ""
    our_mfu = f"{100 * o['mfu_datasheet']:.1f}%" if o else ""
    cross = (f"{100 * o['train_flops_per_token'] * j['tokens_per_s'] / DATASHEET_PEAK:.1f}%"
             if o else "")
    lines.append(f"| {j['case']} | {j['jla_preset']} | {j['batch']}x{j['seq_len']} | {mine} | "
                 f"{j['tokens_per_s']:,} | {ratio} | {our_mfu} | {j['mfu_jla_percent']:.1f}% | {cross} |")
  return lines


def _markdown(meta: dict, records: list[dict], jla: list[dict] | None = None) -> str:
  measured = next((r["measured_peak_tf_s"] for r in records if "measured_peak_tf_s" in r),
                  ceilings.for_device(meta["device"]).matmul_tf_s)
  lines = [f"# Training throughput ({meta['device']})", "",
           f"Date {meta['date']}, commit {meta['commit']}, jax {meta['jax']}. bf16 compute, float32 "
           f"params and AdamW state, length {meta['seq_len']}, impl='auto'. MFU against "
           f"{DATASHEET_PEAK / 1e12:.0f} TFLOP/s (datasheet, as ssm_lab.train logs it) and "
           f"{measured:.0f} TFLOP/s (measured bf16 matmul ceiling of this chip). Median of "
           f"{meta['rounds']} rounds of {meta['steps']} steps after 2 warm-up steps.", "",
           "| case | params | batch x len | step ms | tokens/s | model TFLOP/s | MFU (989) | "
           f"MFU ({measured:.0f}) | peak mem GiB | compile s | impls | first loss / ln V |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in records:
    if "error" in r:
      lines.append(f"| {r['case']} | | | | | | | | | | failed: {r['error'][:160]} | |")
      continue
    impls = ", ".join(f"{k}={v}" for k, v in sorted(r["impls"].items()))
    lines.append(
        f"| {r['case']} | {r['params'] / 1e6:.0f}M | {r['batch']}x{r['seq_len']} | "
        f"{r['step_ms']:.1f} | {r['tokens_per_s']:,} | {r['model_tflops_per_s']} | "
        f"{100 * r['mfu_datasheet']:.1f}% | {100 * r['mfu_measured_peak']:.1f}% | "
        f"{r['peak_memory_gib']} | {r['compile_s']} | {impls} | "
        f"{r['first_loss']} / {r['ln_vocab']} |")
  by = {r["case"]: r for r in records if "error" not in r}
  pre = meta.get("precompile")
  if pre:
    lines += ["", f"Every case was first compiled at once, one process each, into a persistent "
              f"compilation cache ({pre.get('wall_s')} s wall; per case: "
              + ", ".join(f"{k} {v}" for k, v in pre.items() if k != "wall_s")
              + "); the timed processes then ran one at a time, so their `compile s` is mostly "
              "the cache load."]
  lines.append("")
  for size in ("130m", "350m"):
    tf, mb, m2 = (by.get(f"{k}-{size}") for k in ("transformer", "mamba", "mamba2"))
    if tf and mb:
      lines.append(f"- {size}: Mamba / Transformer tokens/s = "
                   f"{mb['tokens_per_s'] / tf['tokens_per_s']:.2f} (target >= 0.8)")
    if tf and m2:
      lines.append(f"- {size}: Mamba-2 / Transformer tokens/s = "
                   f"{m2['tokens_per_s'] / tf['tokens_per_s']:.2f}")
  if "transformer-350m" in by:
    r = by["transformer-350m"]
    lines.append(f"- Transformer 350M MFU {100 * r['mfu_datasheet']:.1f}% of 989 TFLOP/s, "
                 f"{100 * r['mfu_measured_peak']:.1f}% of {measured:.0f} (target >= 45%)")
  if jla:
    lines += _jla_markdown(records, jla)
  return "\n".join(lines) + "\n"


def _child_cmd(name: str, a: argparse.Namespace, compile_only: bool = False) -> list[str]:
  # As a module of the benchmarks package, run from the repository root (REPO on PYTHONPATH).
  return ([sys.executable, "-m", "benchmarks.train_throughput", "--_child", name, "--preset", a.preset,
           "--seq_len", str(a.seq_len), "--steps", str(a.steps), "--rounds", str(a.rounds),
           "--batch", str(a.batch)] + (["--_compile_only"] if compile_only else []))


def cache_env(cache_dir: str) -> dict[str, str]:
  """Environment that makes every JAX process of this run read and write one persistent
  compilation cache, whatever the entry's size or compile time."""
  os.makedirs(cache_dir, exist_ok=True)
  return {"JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def precompile(cmds: dict[str, list[str]], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
  """Runs the compile-only child commands all at once (one process each) into the persistent cache
  that `env` names; returns each one's compile seconds (its CASE_RESULT `compile_only_s`) or why it
  has none, and the wall time.

  Compiling (XLA's autotuning included) takes a case far longer than timing it; run serially, six
  cases need most of a 10-minute device call. In parallel they share the host's cores, and the timed
  processes that follow, one at a time, load their executables from the cache (their `compile_s`
  shows whether they did). The compile processes allocate no model state and do not preallocate
  device memory; a case whose compile fails or times out here is simply compiled again when timed.
  Each child's output goes to a file, so a chatty one cannot block on a full pipe.
  """
  cenv = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  t0 = time.time()
  logs = {k: tempfile.TemporaryFile("w+") for k in cmds}
  procs = {k: subprocess.Popen(c, stdout=logs[k], stderr=subprocess.STDOUT, text=True, env=cenv)
           for k, c in cmds.items()}
  out: dict[str, Any] = {}
  for k, proc in procs.items():
    try:
      proc.wait(timeout=max(1.0, timeout_s - (time.time() - t0)))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      out[k] = f"timed out after {timeout_s:.0f} s"
      continue
    logs[k].seek(0)
    lines = logs[k].read().strip().splitlines()
    found = [ln for ln in lines if ln.startswith("CASE_RESULT ")]
    out[k] = (json.loads(found[-1].split(" ", 1)[1]).get("compile_only_s") if found else
              f"rc {proc.returncode}: " + " / ".join(lines[-2:]))
  for f in logs.values():
    f.close()
  out["wall_s"] = round(time.time() - t0, 1)
  print("PRECOMPILE " + json.dumps(out), flush=True)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  p.add_argument("--preset", choices=("default", "tiny"), default="default")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--steps", type=int, default=5, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch", type=int, default=0, help="override every case's batch size")
  p.add_argument("--case_timeout_s", type=float, default=240)
  p.add_argument("--budget_s", type=float, default=1e9,
                 help="start no case once this many seconds have passed")
  p.add_argument("--commit", default="", help="git commit to record (default: git rev-parse)")
  p.add_argument("--precompile", choices=("on", "off"), default="on",
                 help="first compile every case at once, in parallel processes, into a persistent "
                      "compilation cache that the timed (serial) processes then read")
  p.add_argument("--precompile_timeout_s", type=float, default=200)
  p.add_argument("--cache_dir", default="",
                 help="persistent compilation cache (default: a fresh temporary folder)")
  p.add_argument("--jla", choices=("auto", "on", "off"), default="auto",
                 help="after each case, time jax-linear-attention's trainer on its matching preset "
                      "(auto: when `import jla.cli` works)")
  p.add_argument("--jla_timeout_s", type=float, default=240)
  p.add_argument("--_child", default="", help=argparse.SUPPRESS)
  p.add_argument("--_compile_only", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  table = TINY if a.preset == "tiny" else CASES
  jla_table = JLA_TINY if a.preset == "tiny" else JLA_PRESETS

  if a._child:  # one case, in this process; the record goes to stdout
    spec = dict(table[a._child])
    if a.batch:
      spec["batch"] = a.batch
    record = run_case(a._child, spec, a.seq_len, a.steps, a.rounds,
                      compile_only=a._compile_only)
    print("CASE_RESULT " + json.dumps(record), flush=True)
    return

  names = [n for n in a.cases.split(",") if n] or (DEFAULT_CASES if table is CASES else list(table))
  unknown = sorted(set(names) - set(table))
  if unknown:
    raise ValueError(f"--cases: unknown {unknown}; known: {sorted(table)}")
  commit = git_commit(a.commit)
  probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                          "print(jax.__version__, '|', d.device_kind, '|', d.platform)"],
                         capture_output=True, text=True)
  jax_version, device, platform = [s.strip() for s in (probe.stdout.strip() or "? | ? | ?").split("|")]
  meta = {"device": device, "platform": platform, "jax": jax_version, "commit": commit,
          "date": datetime.date.today().isoformat(), "seq_len": a.seq_len, "steps": a.steps,
          "rounds": a.rounds}
  use_jla = a.jla == "on" or (a.jla == "auto" and jla_available())
  meta["jla"] = use_jla
  if use_jla:
    probe = subprocess.run([sys.executable, "-c", "import jla; print(jla.__version__)"],
                           capture_output=True, text=True)
    meta["jla_version"] = probe.stdout.strip() or probe.stderr.strip()[-200:]
  os.makedirs(a.out, exist_ok=True)
  records: list[dict] = []
  jla_records: list[dict] = []
  start = time.time()
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  if a.precompile == "on":
    env.update(cache_env(a.cache_dir or tempfile.mkdtemp(prefix="ssm_lab_jax_cache_")))
    meta["precompile"] = precompile({n: _child_cmd(n, a, compile_only=True) for n in names}, env,
                                    a.precompile_timeout_s)
  for name in names:
    if time.time() - start > a.budget_s:
      records.append({"case": name, "error": "not run: --budget_s reached"})
      continue
    t0 = time.time()
    try:
      proc = subprocess.run(_child_cmd(name, a), capture_output=True, text=True,
                            timeout=a.case_timeout_s, env=env)
      found = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASE_RESULT ")]
      if proc.returncode == 0 and found:
        record = json.loads(found[-1].split(" ", 1)[1])
      else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        record = {"case": name, "error": f"rc {proc.returncode}: " + " / ".join(tail)}
    except subprocess.TimeoutExpired as err:
      out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
      reached = [ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith("PHASE ")]
      record = {"case": name, "error": f"timed out after {a.case_timeout_s:.0f} s (reached: "
                                       f"{reached[-1] if reached else 'not even imports'})",
                "phases": reached}
    record["wall_s"] = round(time.time() - t0, 1)
    records.append(record)
    print(json.dumps(record), flush=True)
    if use_jla and name in jla_table:
      # Right after ours, in the same process tree and GPU: the pair shares the machine's state.
      if time.time() - start > a.budget_s:
        jrec = {"case": name, "jla_preset": jla_table[name], "batch": 0, "seq_len": a.seq_len,
                "error": "not run: --budget_s reached"}
      else:
        jrec = run_jla(name, jla_table[name], batch=a.batch or table[name]["batch"], seq_len=a.seq_len,
                       steps=a.steps, rounds=a.rounds, timeout_s=a.jla_timeout_s, env=env)
      jla_records.append(jrec)
      print("JLA " + json.dumps(jrec), flush=True)
    with open(os.path.join(a.out, "train_throughput.json"), "w") as f:
      json.dump({"meta": meta, "results": records, "jla": jla_records}, f, indent=1)
  md = _markdown(meta, records, jla_records)
  with open(os.path.join(a.out, "train_throughput.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
