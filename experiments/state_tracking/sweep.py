"""The Illusion of State (Merrill, Petty & Sabharwal 2024, arXiv 2404.08819): the smallest depth at
which a Transformer, Mamba and Mamba-2 reach 90% per-position accuracy on the S5 and A5 word problems
(permutation composition) and on Z60 (the abelian control), against sequence length; an LSTM at one
layer where the "lstm" mixer exists.

One run is one depth search for a (setting, group, length, model): its config is the 1-layer model,
trained until eval accuracy reaches 90% or the step budget ends; its `evaluate` then trains 2, 3, ...
layers in sub-workdirs (`<workdir>/depth<k>`, each through the runner's `train_run`, so through
`ssm_lab.train`), stopping at the first depth that reaches 90%. Run names are
`<setting>-<group>-L<length>-<model>`, so `--only 'gpu-S5-*-mamba'` selects one model's lengths.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from ssm_lab.experiments import Run, markdown_table, pivot, sweep_config
from ssm_lab.experiments.study import letter_of, scored_accuracy

THRESHOLD = 0.9
GROUPS = ["S5", "A5", "Z60"]

# name -> (mixer config group, block_mlp, deepest model tried). The LSTM is a recurrent baseline at
# one layer only.
MODELS: dict[str, tuple[str, bool, int]] = {
    "transformer": ("attention", True, 8),
    "mamba": ("mamba", False, 8),
    "mamba2": ("mamba2", False, 8),
    "lstm": ("lstm", False, 1),
}

# Each setting: width, lengths, depth cap, steps per depth, batch, eval examples, early-stop checks.
# "gpu" is the planned device sweep; "cpu" a small one that two shared CPU cores finish in about 15
# minutes (A5 and Z60 only, Transformer and Mamba, depths 1-2, lengths 4 and 8).
SETTINGS: dict[str, dict[str, Any]] = {
    # 20,000 steps per depth: a 1-layer LSTM needs ~8,000 to pass 90% on S5 at length 4 (94% at
    # 8,000, 76% at 6,000; batch 64, lr 1e-3, CPU run of 2026-12-07), so 4,000 would call a depth
    # failed that only needed longer training.
    "gpu": dict(d_model=128, lengths=[4, 8, 16, 32, 64], max_depth=8, num_steps=20000, batch_size=64,
                lr=1e-3, eval_examples=1024, segments=10),
    "cpu": dict(d_model=64, lengths=[4, 8], max_depth=2, num_steps=300, batch_size=32,
                lr=3e-3, eval_examples=512, segments=3, groups=["A5", "Z60"],
                models=["transformer", "mamba"]),
    # More steps on CPU, with the LSTM baseline: lengths 8 and 16, depths 1-2.
    "cpu2": dict(d_model=64, lengths=[8, 16], max_depth=2, num_steps=1500, batch_size=64,
                 lr=3e-3, eval_examples=512, segments=3, groups=["A5", "Z60"],
                 models=["transformer", "mamba", "lstm"]),
    # The gpu setting on two CPU cores at lengths 4 and 8: S5 and Z60, depths 1-2, every model. (With
    # 10,000 steps the cosine schedule decays too early: the LSTM ended at 71% on S5.)
    "cpu3": dict(d_model=128, lengths=[4, 8], max_depth=2, num_steps=20000, batch_size=64,
                 lr=1e-3, eval_examples=512, segments=10, groups=["S5", "Z60"]),
}
SMOKE = dict(d_model=16, lengths=[4], max_depth=2, num_steps=4, batch_size=8, lr=1e-2,
             eval_examples=16, segments=1)


def models() -> dict[str, tuple[str, bool, int]]:
  """The models whose mixer is registered today."""
  return {k: v for k, v in MODELS.items() if letter_of(v[0]) is not None}


def make_config(group: str, length: int, model: str, depth: int, *, d_model: int, num_steps: int,
                batch_size: int, lr: float, eval_examples: int, segments: int,
                **_: Any) -> ml_collections.ConfigDict:
  """A `depth`-layer model of kind `model` on the `group` word problem at `length`."""
  mixer, block_mlp, _ = MODELS[model]
  letter = letter_of(mixer)
  if letter is None:
    raise KeyError(f"state_tracking: model {model!r} needs the mixer group {mixer!r}, which no "
                   f"registered mixer has")
  task = dict(name="word_problem", group=group, seq_len=length, seed=0,
              num_eval_examples=eval_examples, eval_seq_len=0)
  return sweep_config(task, pattern=letter * depth, d_model=d_model, block_mlp=block_mlp,
                      batch_size=batch_size, num_steps=num_steps, learning_rate=lr,
                      segments=segments)


def with_depth(config: ml_collections.ConfigDict, depth: int) -> ml_collections.ConfigDict:
  """`config` with `depth` blocks of its mixer (a copy)."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.pattern = config.model.pattern[0] * depth
  return out


def depth_search(max_depth: int, threshold: float = THRESHOLD
                 ) -> Callable[[str, ml_collections.ConfigDict], dict[str, Any]]:
  """The run's `evaluate`: measures the trained 1-layer model, then trains deeper ones in
  `<workdir>/depth<k>` until one reaches `threshold` per-position accuracy (or `max_depth`)."""

  def evaluate(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    from ssm_lab.data import make_task  # noqa: PLC0415
    from ssm_lab.experiments.runner import train_run  # noqa: PLC0415
    from ssm_lab.runs import load_run  # noqa: PLC0415

    out: dict[str, Any] = {"min_depth": None, "max_depth": max_depth, "threshold": threshold,
                           "accuracy_by_depth": {}, "last_position_accuracy_by_depth": {},
                           "steps_by_depth": {}}

    def measure(sub: str, cfg: ml_collections.ConfigDict) -> tuple[dict[str, float], int]:
      loaded = load_run(sub)
      batches = make_task(cfg.task).eval_batches(cfg.train.batch_size)
      return scored_accuracy(loaded, batches), loaded.step

    for depth in range(1, max_depth + 1):
      cfg = with_depth(config, depth)
      sub = workdir if depth == 1 else os.path.join(workdir, f"depth{depth}")
      # Depth 1 was trained by the runner. A deeper one is trained here, unless a rerun finds it
      # already finished or already past the threshold (train_run would train it one more segment).
      acc, step = measure(sub, cfg) if depth == 1 or _has_checkpoint(sub) else ({}, 0)
      if depth > 1 and (not acc or (acc["accuracy"] < threshold and step < cfg.train.num_steps)):
        train_run(Run(name=f"depth{depth}", config=cfg, early_stop=("accuracy", threshold)), sub)
        acc, step = measure(sub, cfg)
      out["accuracy_by_depth"][str(depth)] = acc["accuracy"]
      out["last_position_accuracy_by_depth"][str(depth)] = acc["last_position_accuracy"]
      out["steps_by_depth"][str(depth)] = step
      if acc["accuracy"] >= threshold:
        out["min_depth"] = depth
        break
    return out

  return evaluate


def _has_checkpoint(workdir: str) -> bool:
  ckpts = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))


def _run(setting: str, group: str, length: int, model: str, spec: dict[str, Any]) -> Run:
  max_depth = min(spec["max_depth"], MODELS[model][2])
  return Run(name=f"{setting}-{group}-L{length}-{model}",
             config=make_config(group, length, model, 1, **spec),
             evaluate=depth_search(max_depth),
             tags=dict(setting=setting, group=group, seq_len=length, model=model,
                       d_model=spec["d_model"], max_depth=max_depth),
             early_stop=("accuracy", THRESHOLD))


def runs(smoke: bool = False) -> list[Run]:
  if smoke:  # seconds on CPU: one length; the Transformer searches depths 1-2 (4 steps reach no
    # 90%), Mamba depth 1 only
    return [_run("smoke", "S5", 4, model, dict(SMOKE, max_depth=cap))
            for model, cap in (("transformer", 2), ("mamba", 1))]
  return [_run(setting, group, length, model, spec)
          for setting, spec in SETTINGS.items() for length in spec["lengths"]
          for group in spec.get("groups", GROUPS) for model in models()
          if model in spec.get("models", MODELS)]


def min_depth_cell(record: dict[str, Any]) -> str:
  depth = record["metrics"].get("min_depth")
  return str(depth) if depth is not None else f"> {record['tags']['max_depth']}"


def table(results: list[dict]) -> str:
  """The smallest depth reaching 90% per-position accuracy: a row per (setting, group, model), a
  column per length."""
  done = [r for r in results if "accuracy_by_depth" in r.get("metrics", {})]
  if not done:
    return "No finished runs yet."
  parts = []
  for setting in sorted({r["tags"]["setting"] for r in done}):
    rows = [r for r in done if r["tags"]["setting"] == setting]
    spec = SETTINGS.get(setting, SMOKE)
    header, cells = pivot(rows, rows=("group", "model"), col="seq_len", value=min_depth_cell)
    devices = sorted({f"{r['device']['kind']} x{r['device']['count']}" for r in rows})
    commits = sorted({r["commit"][:12] for r in rows})
    parts.append(
        f"**Setting `{setting}`** (d_model {spec['d_model']}, at most {spec['num_steps']:,} steps "
        f"of batch {spec['batch_size']} per depth, learning rate {spec['lr']:g}; devices: "
        f"{', '.join(devices)}; commits: {', '.join(commits)}). Smallest depth reaching "
        f"{THRESHOLD:.0%} per-position accuracy on {spec['eval_examples']:,} held-out sequences; "
        f"\"> k\": no depth up to k did.\n\n" + markdown_table(header, cells))
    acc_header, acc_cells = pivot(rows, rows=("group", "model"), col="seq_len",
                                  value=lambda r: " / ".join(
                                      f"{v:.2f}" for v in r["metrics"]["accuracy_by_depth"].values()))
    parts.append(f"Per-position accuracy of depth 1, 2, ... in the search (setting `{setting}`):\n\n"
                 + markdown_table(acc_header, acc_cells))
  return "\n\n".join(parts)
