"""Mamba's synthetic tasks (Gu & Dao 2023, arXiv 2312.00752, section 4.1).

Selective copying (Table 1): 2-layer models, d_model 64, on length-4,096 sequences with 16 tokens to
copy; rows are the architecture (the bare SSM "no gate", or inside the Mamba block) and the inner
layer (S4D, i.e. LTI, or the selective S6). Run names `copy-<model>-lr<lr>`.

Induction heads (Table 2): 2-layer models trained at length 256, then tested at lengths 2^6 .. 2^20
by the run's `evaluate` (a few sequences per length; a length that runs out of memory ends that
model's sweep and is recorded, not failed). Run names `induction-<model>` (10,000 steps),
`induction40k-<model>` (40,000) and `cpu-induction-<model>` (2,000 steps, tested to 2^14, on CPU).

Mixers are looked up by config group (S4D: `s4d`, Hyena: `hyena`); a row whose mixer is not
registered is left out.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from ssm_lab.experiments import Run, markdown_table, sweep_config
from ssm_lab.experiments.study import is_out_of_memory, letter_of, scored_accuracy

D_MODEL = 64
LAYERS = 2

# Selective copying: paper E.1 setting, our step budget (the paper trains 400K steps).
COPY = dict(seq_len=4096, vocab_size=16, num_tokens=16, batch_size=64, num_steps=8000,
            eval_examples=512, segments=8)
COPY_LRS = [1e-4, 1e-3]  # the paper's constant 1e-4, and 1e-3 for our shorter budget
# This host's CPU: the same task shortened to length 256 (16 tokens to copy), 2,000 steps of 16, at
# 1e-3; the LTI rows against S6, the ranking Table 1 is about.
CPU_COPY = dict(seq_len=256, batch_size=16, num_steps=2000, eval_examples=256, segments=4)
CPU_COPY_MODELS = ["s4d_nogate", "mamba_s4d", "h3_hyena", "mamba_s6"]

# Induction heads: train at 2^8, test at 2^6 .. 2^20.
INDUCTION = dict(seq_len=256, vocab_size=16, batch_size=8, num_steps=10000, lr=1e-3,
                 eval_examples=512, segments=5)
TEST_LOG2 = list(range(6, 21))
LONG_INDUCTION = dict(num_steps=40_000, segments=8)
CPU_INDUCTION = dict(num_steps=2000, eval_examples=256, segments=2)
CPU_TEST_LOG2 = list(range(6, 15))
TOKENS_PER_LENGTH = 2 ** 22     # test sequences per length: this many tokens, 16 .. 512 sequences
MIN_SEQS, MAX_SEQS = 16, 512
BATCH_TOKENS = 2 ** 18          # tokens per evaluation batch (at least one sequence)

# Paper numbers (Gu & Dao 2023, Table 1), selective-copying accuracy in %.
PAPER_COPY = {"s4d_nogate": 18.3, "s6_nogate": 97.0, "mamba_s4d": 56.4, "h3_hyena": 30.1,
              "mamba_s6": 99.8}

# name -> (paper row, mixer group, {group: fields}). "s6_nogate" (S6 without its gate) is not here:
# our Mamba mixer always multiplies by silu(z) and has no field to turn it off.
COPY_MODELS: dict[str, tuple[str, str, dict[str, dict]]] = {
    "s4d_nogate": ("No gate / S4 (LTI)", "s4d", {"s4d": dict(gate=False)}),
    "mamba_s4d": ("Mamba / S4 (LTI)", "s4d", {"s4d": dict(gate=True)}),
    "h3_hyena": ("H3 / Hyena", "hyena", {}),
    "mamba_s6": ("Mamba / S6", "mamba", {"mamba": dict(d_state=16, expand=2)}),
    "mamba2": ("(Mamba-2, not in the paper)", "mamba2", {"mamba2": dict(d_state=64, expand=2)}),
}

# name -> (layer groups of the 2 blocks, {group: fields}).
INDUCTION_MODELS: dict[str, tuple[tuple[str, ...], dict[str, dict]]] = {
    "mamba": (("mamba", "mamba"), {"mamba": dict(d_state=16, expand=2)}),
    "attention": (("attention", "attention"), {"attention": dict(num_heads=4, num_kv_heads=4)}),
    "mamba2": (("mamba2", "mamba2"), {"mamba2": dict(d_state=64, expand=2)}),
    "hybrid": (("attention", "mamba"), {"attention": dict(num_heads=4, num_kv_heads=4),
                                       "mamba": dict(d_state=16, expand=2)}),
    "s4d": (("s4d", "s4d"), {"s4d": dict(gate=True)}),
    "hyena": (("hyena", "hyena"), {}),
}


def _pattern(groups: tuple[str, ...]) -> str | None:
  letters = [letter_of(g) for g in groups]
  return None if None in letters else "".join(letters)  # type: ignore[arg-type]


def copy_models() -> dict[str, tuple[str, str, dict[str, dict]]]:
  """The selective-copying rows whose mixer is registered today."""
  return {k: v for k, v in COPY_MODELS.items() if letter_of(v[1]) is not None}


def induction_models() -> dict[str, tuple[tuple[str, ...], dict[str, dict]]]:
  """The induction-heads models whose mixers are registered today."""
  return {k: v for k, v in INDUCTION_MODELS.items() if _pattern(v[0]) is not None}


def _base(pattern: str, mixers: dict[str, dict], task: dict[str, Any], *, batch_size: int,
          num_steps: int, lr: float, segments: int, constant_lr: bool
          ) -> ml_collections.ConfigDict:
  # constant_lr: the paper's constant rate, no warmup and no decay.
  return sweep_config(task, pattern=pattern, d_model=D_MODEL, mixers=mixers, batch_size=batch_size,
                      num_steps=num_steps, learning_rate=lr, warmup_steps=min(500, num_steps // 10),
                      constant_lr=constant_lr, segments=segments)


def copy_config(model: str, lr: float, **over: Any) -> ml_collections.ConfigDict:
  _, group, mixers = COPY_MODELS[model]
  s = dict(COPY, **over)
  letter = letter_of(group)
  if letter is None:
    raise KeyError(f"synthetics: model {model!r} needs mixer group {group!r}, not registered")
  task = dict(name="selective_copying", vocab_size=s["vocab_size"], seq_len=s["seq_len"],
              num_tokens=s["num_tokens"], seed=0, num_eval_examples=s["eval_examples"])
  return _base(letter * LAYERS, mixers, task, batch_size=s["batch_size"], num_steps=s["num_steps"],
               lr=lr, segments=s["segments"], constant_lr=True)


def induction_config(model: str, **over: Any) -> ml_collections.ConfigDict:
  groups, mixers = INDUCTION_MODELS[model]
  pattern = _pattern(groups)
  if pattern is None:
    raise KeyError(f"synthetics: model {model!r} needs mixer groups {groups}, not all registered")
  s = dict(INDUCTION, **over)
  task = dict(name="induction_heads", vocab_size=s["vocab_size"], seq_len=s["seq_len"],
              answer_len=1, seed=0, num_eval_examples=s["eval_examples"], eval_seq_len=0)
  return _base(pattern, mixers, task, batch_size=s["batch_size"], num_steps=s["num_steps"],
               lr=s["lr"], segments=s["segments"], constant_lr=False)


def length_sweep(test_log2: list[int], tokens_per_length: int = TOKENS_PER_LENGTH,
                 batch_tokens: int = BATCH_TOKENS, min_seqs: int = MIN_SEQS,
                 max_seqs: int = MAX_SEQS) -> Callable[[str, ml_collections.ConfigDict], dict]:
  """The induction run's `evaluate`: accuracy at the answer position for each test length 2^k (the
  trained model, fresh test sequences); the first length that runs out of memory ends the sweep."""

  def evaluate(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    from ssm_lab.data import make_task  # noqa: PLC0415
    from ssm_lab.runs import load_run  # noqa: PLC0415

    run = load_run(workdir)
    out: dict[str, Any] = {"accuracy_by_log2_length": {}, "sequences_by_log2_length": {},
                           "oom_at_log2_length": None}
    for k in test_log2:
      length = 2 ** k
      n = max(min_seqs, min(max_seqs, tokens_per_length // length))
      task = make_task(ml_collections.ConfigDict(dict(config.task.to_dict(), eval_seq_len=length,
                                                      num_eval_examples=n)))
      acc = None
      for batch in dict.fromkeys((max(1, batch_tokens // length), 1)):  # one sequence at a time last
        try:
          acc = scored_accuracy(run, task.eval_batches(batch))
          break
        except Exception as err:  # out of memory: retry one sequence at a time, then stop here
          if not is_out_of_memory(err):
            raise
          out["oom_error"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"[:300]
      if acc is None:
        out["oom_at_log2_length"] = k
        break
      out.pop("oom_error", None)
      out["accuracy_by_log2_length"][str(k)] = acc["accuracy"]
      out["sequences_by_log2_length"][str(k)] = n
    return out

  return evaluate


def runs(smoke: bool = False) -> list[Run]:
  if smoke:  # seconds on CPU: tiny lengths and steps; Mamba on both tasks, tests to 2^6
    small = dict(seq_len=32, num_steps=4, batch_size=8, eval_examples=16, segments=1)
    out = [Run(name="copy-mamba_s6-lr1.0e-03", config=copy_config("mamba_s6", 1e-3, **small,
                                                                   num_tokens=4),
               tags=dict(task="copy", model="mamba_s6", lr=1e-3), early_stop=("accuracy", 0.99))]
    out.append(Run(name="induction-mamba", config=induction_config("mamba", **small),
                   evaluate=length_sweep([4, 5, 6], tokens_per_length=256, batch_tokens=256,
                                         min_seqs=2, max_seqs=8),
                   tags=dict(task="induction", model="mamba", train_seq_len=32)))
    return out
  out = [Run(name=f"copy-{m}-lr{lr:.1e}", config=copy_config(m, lr),
             tags=dict(task="copy", model=m, lr=lr), early_stop=("accuracy", 0.99))
         for m in copy_models() for lr in COPY_LRS]
  out += [Run(name=f"cpu-copy-{m}-lr1.0e-03", config=copy_config(m, 1e-3, **CPU_COPY),
              tags=dict(task="copy", model=m, lr=1e-3, setting="cpu"), early_stop=("accuracy", 0.99))
          for m in CPU_COPY_MODELS if m in copy_models()]
  out += [Run(name=f"induction-{m}", config=induction_config(m), evaluate=length_sweep(TEST_LOG2),
              tags=dict(task="induction", model=m, train_seq_len=INDUCTION["seq_len"]))
          for m in induction_models()]
  # 10,000 steps left every model at chance (the hybrid on an H100, three models on CPU at 2,000);
  # a reproduction on the Mamba tracker needed ~40K steps at batch 8 (state-spaces/mamba#62).
  out += [Run(name=f"induction40k-{m}", config=induction_config(m, **LONG_INDUCTION),
              evaluate=length_sweep(TEST_LOG2),
              tags=dict(task="induction", model=m, train_seq_len=INDUCTION["seq_len"]))
          for m in induction_models()]
  # The CPU setting: the paper's task and model, fewer steps, tested to 2^14 (two CPU cores).
  out += [Run(name=f"cpu-induction-{m}", config=induction_config(m, **CPU_INDUCTION),
              evaluate=length_sweep(CPU_TEST_LOG2, tokens_per_length=2 ** 17, batch_tokens=2 ** 14,
                                    min_seqs=8, max_seqs=256),
              tags=dict(task="induction", model=m, train_seq_len=INDUCTION["seq_len"], setting="cpu"))
          for m in ("mamba", "attention", "mamba2") if m in induction_models()]
  return out


def induction_label(r: dict) -> str:
  """"mamba (40,000 steps)", "mamba (CPU, 2,000 steps)": the same model trained for different budgets
  has a row (and a line) each."""
  where = "CPU, " if r["tags"].get("setting") == "cpu" else ""
  return f"{r['tags']['model']} ({where}{r['train']['steps']:,} steps)"


def _provenance(records: list[dict]) -> str:
  devices = sorted({f"{r['device']['kind']} x{r['device']['count']}" for r in records})
  commits = sorted({r["commit"][:12] for r in records})
  return f"devices: {', '.join(devices)}; commits: {', '.join(commits)}"


def table(results: list[dict]) -> str:
  """Selective copying: accuracy per (model, learning rate) beside the paper's; induction heads:
  accuracy per test length."""
  copy = [r for r in results if r["tags"].get("task") == "copy"]
  induction = [r for r in results if r["tags"].get("task") == "induction"]
  if not copy and not induction:
    return "No finished runs yet."
  parts = []
  if copy:
    lrs = sorted({r["tags"]["lr"] for r in copy})
    rows = []
    settings = sorted({r["tags"].get("setting", "full") for r in copy}, key=lambda x: x != "full")
    for setting in settings:
      for model in [m for m in COPY_MODELS if any(r["tags"]["model"] == m for r in copy)]:
        mine = [r for r in copy if r["tags"]["model"] == model
                and r["tags"].get("setting", "full") == setting]
        if not mine:
          continue
        cells = []
        for lr in lrs:
          hit = [r for r in mine if r["tags"]["lr"] == lr]
          cells.append(f"{100 * hit[0]['metrics']['accuracy']:.1f} ({hit[0]['train']['steps']:,} "
                       "steps)" if hit else None)
        paper = PAPER_COPY.get(model)
        length = mine[0]["config"]["task"]["seq_len"]
        rows.append([model, COPY_MODELS[model][0], f"{setting}, L {length:,}", *cells,
                     f"{paper:.1f}" if paper else None])
    parts.append("**Selective copying** (accuracy % on the marker positions of held-out "
                 "sequences; steps trained, stopping at 99%; paper: Gu & Dao 2023, Table 1, "
                 f"400K steps; {_provenance(copy)})\n\n"
                 + markdown_table(["model", "arch / inner layer", "setting",
                                   *(f"lr {lr:g}" for lr in lrs), "paper (L 4,096)"], rows))
  if induction:
    ks = sorted({int(k) for r in induction for k in r["metrics"]["accuracy_by_log2_length"]}
                | {r["metrics"]["oom_at_log2_length"] for r in induction
                   if r["metrics"].get("oom_at_log2_length") is not None})
    rows = []
    for r in sorted(induction, key=lambda r: (list(INDUCTION_MODELS).index(r["tags"]["model"]),
                                              r["tags"].get("setting", ""), r["train"]["steps"])):
      acc, oom = r["metrics"]["accuracy_by_log2_length"], r["metrics"].get("oom_at_log2_length")
      label = induction_label(r)
      rows.append([label, *(f"{100 * acc[str(k)]:.0f}" if str(k) in acc
                                          else ("OOM" if k == oom else None) for k in ks)])
    train = sorted({r["tags"]["train_seq_len"] for r in induction})
    parts.append(f"**Induction heads** (accuracy % at the answer position; trained at length "
                 f"{', '.join(map(str, train))}; columns are test lengths 2^k; OOM: that length ran "
                 f"out of memory and longer ones were not tried; {_provenance(induction)})\n\n"
                 + markdown_table(["model", *(f"2^{k}" for k in ks)], rows))
  return "\n\n".join(parts)
