"""Populations against one-by-one training: R small MQAR runs that differ only in learning rate,
trained R times alone or once as a vmapped population (`ssm_lab.train.population_step`, the step
`train_and_evaluate_many` runs).

Two measurements per case (model pattern, batch size):
  * step: the jitted train step alone on device-resident batches. Compile time, then N steps timed
    (blocked on the last): one by one = R programs x N steps each; population = one program x N.
  * loop (`--loop`, default on): the whole training loop, `train_and_evaluate` per run against one
    `train_and_evaluate_many` of R, N steps with one evaluation and one checkpoint at the end, in
    fresh workdirs; wall time including compilation.

  python -m benchmarks.population --out DIR [--members 4] [--steps 50] [--batch_sizes 64,256,512]
      [--patterns AA,MM] [--vocab 8192] [--seq_len 256] [--no-loop]

Writes population.json and population.md under --out (device and date in both) and prints the
table. Runs on whatever backend JAX picks (CPU or one GPU).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ssm_lab import config as config_lib
from ssm_lab import parallel, train
from ssm_lab.provenance import git_commit


def make_config(pattern: str, batch_size: int, steps: int, lr: float, vocab: int = 8192,
                seq_len: int = 256) -> ml_collections.ConfigDict:
  """A small MQAR run: 2 layers of d_model 64 (the kind a learning-rate sweep trains dozens of)."""
  config = config_lib.base_config()
  config.task = ml_collections.ConfigDict(dict(name="mqar", vocab_size=vocab, seq_len=seq_len,
                                               num_kv_pairs=min(16, seq_len // 8),
                                               num_eval_examples=256))
  config.model.pattern = pattern
  config.model.d_model = 64
  config.model.attention.num_heads = 2
  config.model.attention.num_kv_heads = 2
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps, t.learning_rate = batch_size, steps, 2, lr
  t.log_every, t.eval_every, t.checkpoint_every = steps, steps, steps
  t.progress_bar = False
  return config


def _timed(fn: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - start


def step_case(configs: list[ml_collections.ConfigDict], steps: int) -> dict[str, Any]:
  """{one_by_one, population}: compile_s, run_s (N steps, compile excluded) of the train step."""
  config = configs[0]
  t = config.train
  task = train.make_task(config.task)
  model = train.build_model(config.model, vocab_size=task.vocab_size)
  mesh = parallel.make_mesh(jax.local_devices()[:1])
  batches = [parallel.shard_batch(task.train_batch(s, t.batch_size), mesh) for s in range(steps)]
  kw = dict(model=model, kind=task.kind, accum=1, mesh=mesh)
  out: dict[str, Any] = {}

  compile_s = run_s = 0.0
  for c in configs:  # one by one: each run compiles its own step (its schedule is a constant)
    tx = train.make_optimizer(c.train, c.model.pattern)
    init = train._state_initializer(task, model, tx)
    state = jax.jit(init)(jax.random.PRNGKey(c.seed))
    step = jax.jit(functools.partial(train.train_step, tx=tx, **kw), donate_argnums=0)
    compiled, dt = _timed(lambda: step.lower(state, batches[0]).compile())  # noqa: B023
    compile_s += dt
    def run(state=state, compiled=compiled):
      for b in batches:
        state, metrics = compiled(state, b)
      return state
    _, dt = _timed(run)
    run_s += dt
  out["one_by_one"] = {"compile_s": compile_s, "run_s": run_s}

  tx = train.make_optimizer(t, config.model.pattern, unit_lr=True)
  init = train._state_initializer(task, model, tx)
  keys = jnp.stack([jax.random.PRNGKey(c.seed) for c in configs])
  state = jax.jit(jax.vmap(init))(keys)
  lrs = jnp.asarray([c.train.learning_rate for c in configs], jnp.float32)
  active = jnp.ones(len(configs), bool)
  step = jax.jit(functools.partial(train.population_step, tx=tx, **kw), donate_argnums=0)
  compiled, compile_s = _timed(lambda: step.lower(state, batches[0], lrs, active).compile())

  def run_population(state=state):
    for b in batches:
      state, metrics = compiled(state, b, lrs, active)
    return state
  _, run_s = _timed(run_population)
  out["population"] = {"compile_s": compile_s, "run_s": run_s}
  return out


def loop_case(configs: list[ml_collections.ConfigDict]) -> dict[str, float]:
  """Wall seconds of the whole loop (compile, N steps, one eval and checkpoint): R single runs
  against one population."""
  with tempfile.TemporaryDirectory() as root:
    dirs = [os.path.join(root, f"single{i}") for i in range(len(configs))]
    start = time.perf_counter()
    for c, d in zip(configs, dirs, strict=True):
      train.train_and_evaluate(c, d)
    single = time.perf_counter() - start
    dirs = [os.path.join(root, f"member{i}") for i in range(len(configs))]
    start = time.perf_counter()
    outcomes = train.train_and_evaluate_many(configs, dirs)
    population = time.perf_counter() - start
    failed = [o for o in outcomes if isinstance(o, Exception)]
    if failed:
      raise failed[0]
  return {"one_by_one": single, "population": population}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--members", type=int, default=4)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--batch_sizes", default="64,256,512")
  parser.add_argument("--patterns", default="AA,MM")
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  device = jax.devices()[0]
  meta = {"device": f"{device.platform}: {device.device_kind}", "devices": jax.device_count(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "commit": git_commit(), "jax": jax.__version__, "members": args.members,
          "steps": args.steps, "cpu_count": os.cpu_count(), "vocab": args.vocab,
          "seq_len": args.seq_len}
  lrs = [1e-3 * 2.0 ** i for i in range(args.members)]
  rows = []
  for pattern in args.patterns.split(","):
    for bs in (int(b) for b in args.batch_sizes.split(",")):
      configs = [make_config(pattern, bs, args.steps, lr, args.vocab, args.seq_len) for lr in lrs]
      for i, c in enumerate(configs):
        c.seed = i
      row: dict[str, Any] = {"pattern": pattern, "batch_size": bs, **step_case(configs, args.steps)}
      if args.loop:
        row["loop_s"] = loop_case(configs)
      rows.append(row)
      print(json.dumps(row), flush=True)
      table = write(args, meta, rows)  # after every case: a run cut short keeps what it measured
  print(table)
  return 0


def write(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
  with open(os.path.join(args.out, "population.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=2)
  r, n = args.members, args.steps
  lines = [f"# Population of {r} vs {r} runs one by one", "",
           f"{meta['device']} ({meta['devices']} device(s), {meta['cpu_count']} CPUs), "
           f"{meta['date']}, commit {meta['commit']}, jax {meta['jax']}. MQAR, 2 layers, d_model "
           f"64, vocab {args.vocab}, length {args.seq_len}; {n} steps per run. Member steps/s = "
           f"R x N / run time (compile excluded); 'incl. compile' adds the compile time(s); "
           f"'loop' is the whole training loop (`train_and_evaluate` x R vs "
           f"`train_and_evaluate_many`, one eval and one checkpoint).", "",
           "| pattern | batch | one by one: member steps/s | population: member steps/s | speedup "
           "| compile s (R x 1 vs 1) | wall N steps incl. compile (1x1 vs pop) | loop wall s "
           "(1x1 vs pop) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    a, b = row["one_by_one"], row["population"]
    loop = row.get("loop_s")
    lines.append(
        f"| {row['pattern']} | {row['batch_size']} | {r * n / a['run_s']:.1f} | "
        f"{r * n / b['run_s']:.1f} | {a['run_s'] / b['run_s']:.2f}x | "
        f"{a['compile_s']:.1f} vs {b['compile_s']:.1f} | "
        f"{a['compile_s'] + a['run_s']:.1f} vs {b['compile_s'] + b['run_s']:.1f} | "
        + (f"{loop['one_by_one']:.1f} vs {loop['population']:.1f} |" if loop else "- |"))
  table = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "population.md"), "w") as f:
    f.write(table)
  return table


if __name__ == "__main__":
  sys.exit(main())
