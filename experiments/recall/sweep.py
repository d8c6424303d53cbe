"""Zoology's MQAR gap (Arora et al. 2023, arXiv 2312.04927, Figure 2): recall accuracy of 2-layer
attention, Mamba, Mamba-2 and hybrid models against model width, for four (length, key-value pairs)
settings; the best of four learning rates per cell.

Run names are `L<seq_len>-d<d_model>-<model>-lr<lr>`, so `--only 'L64-*-mamba-*'` selects one unit.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from ssm_lab.experiments import (Run, available_letters, best_over, markdown_table, pivot,
                                 sweep_config)

# (seq_len, num_kv_pairs) and the batch size Zoology uses at that length.
SETTINGS = [(64, 4), (128, 8), (256, 16), (512, 64)]
BATCH = {64: 512, 128: 512, 256: 256, 512: 128}
D_MODELS = [64, 128, 256, 512]
LEARNING_RATES = [float(x) for x in np.logspace(-4, -2, 4)]
VOCAB = 8192
TRAIN_EXAMPLES, EPOCHS, TEST_EXAMPLES = 100_000, 64, 3_000
CPU = dict(seq_len=128, num_kv_pairs=8, d_models=[64], models=["attention", "mamba", "mamba2_n64"],
           lr=3e-3, batch_size=32, num_steps=2000, eval_examples=1000, segments=2)
SEGMENTS = 4  # early-stop checks per run (each resumes training in a new train_and_evaluate call)

# name -> (layer pattern, {mixer group: fields}); every model has 2 blocks and no MLP.
MODELS: dict[str, tuple[str, dict[str, dict]]] = {
    "attention": ("AA", {"attention": dict(num_heads=1, num_kv_heads=1)}),
    "mamba": ("MM", {"mamba": dict(d_state=16, expand=2)}),
    "mamba2_n64": ("SS", {"mamba2": dict(d_state=64, expand=2)}),
    "mamba2_n128": ("SS", {"mamba2": dict(d_state=128, expand=2)}),
    "hybrid": ("AM", {"attention": dict(num_heads=1, num_kv_heads=1),
                      "mamba": dict(d_state=16, expand=2)}),
    "hyena": ("HH", {}),  # Hyena order 2, the gated-convolution family
}


def models() -> dict[str, tuple[str, dict[str, dict]]]:
  """The models whose layer letters the model stack knows today."""
  letters = available_letters()
  return {k: v for k, v in MODELS.items() if set(v[0]) <= letters}


def make_config(seq_len: int, num_kv_pairs: int, d_model: int, model: str, lr: float, *,
                vocab: int = VOCAB, batch_size: int | None = None, num_steps: int | None = None,
                eval_examples: int = TEST_EXAMPLES, segments: int = SEGMENTS) -> ml_collections.ConfigDict:
  """One run's config. Steps default to EPOCHS passes over TRAIN_EXAMPLES at the length's batch."""
  pattern, mixers = MODELS[model]
  batch_size = batch_size or BATCH[seq_len]
  num_steps = num_steps or EPOCHS * TRAIN_EXAMPLES // batch_size
  task = dict(name="mqar", vocab_size=vocab, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
              power_a=0.01, seed=0, num_eval_examples=eval_examples)
  return sweep_config(task, pattern=pattern, d_model=d_model, mixers=mixers, batch_size=batch_size,
                      num_steps=num_steps, learning_rate=lr, segments=segments)


def runs(smoke: bool = False) -> list[Run]:
  if smoke:  # seconds on CPU: attention at two learning rates (so best_over picks), one Mamba
    cells = [("attention", 16, 1e-3), ("attention", 16, 1e-2), ("mamba", 16, 1e-2)]
    return [Run(name=f"L32-d{d}-{model}-lr{lr:.1e}",
                config=make_config(32, 4, d, model, lr, vocab=64, batch_size=16, num_steps=4,
                                   eval_examples=32, segments=1),
                tags=dict(setting="smoke", seq_len=32, num_kv_pairs=4, d_model=d, model=model,
                          lr=lr),
                early_stop=("accuracy", 0.99))
            for model, d, lr in cells if model in models()]
  out = []
  # This host's CPU: one (length, pairs) setting at d_model 64, one learning rate, 2,000 steps of 32.
  for model in CPU["models"]:
    for d in CPU["d_models"]:
      seq_len, kv, lr = CPU["seq_len"], CPU["num_kv_pairs"], CPU["lr"]
      out.append(Run(name=f"cpu-L{seq_len}-d{d}-{model}-lr{lr:.1e}",
                     config=make_config(seq_len, kv, d, model, lr, batch_size=CPU["batch_size"],
                                        num_steps=CPU["num_steps"], eval_examples=CPU["eval_examples"],
                                        segments=CPU["segments"]),
                     tags=dict(setting="cpu", seq_len=seq_len, num_kv_pairs=kv, d_model=d,
                               model=model, lr=lr),
                     early_stop=("accuracy", 0.99)))
  for seq_len, kv in SETTINGS:
    for model in models():
      for d in D_MODELS:
        for lr in LEARNING_RATES:
          out.append(Run(name=f"L{seq_len}-d{d}-{model}-lr{lr:.1e}",
                         config=make_config(seq_len, kv, d, model, lr),
                         tags=dict(setting="full", seq_len=seq_len, num_kv_pairs=kv, d_model=d,
                                   model=model, lr=lr),
                         early_stop=("accuracy", 0.99)))
  return out


def table(results: list[dict]) -> str:
  """Best-of-learning-rates accuracy: a row per (length, model), a column per d_model."""
  best = best_over(results, key="lr", metric_key="accuracy")
  if not best:
    return "No finished runs yet."
  header, rows = pivot(best, rows=("setting", "seq_len", "model"), col="d_model",
                       value=lambda r: f"{r['metrics']['accuracy']:.3f}"
                       + ("" if r["best_over"]["ok"] == r["best_over"]["tried"] else
                          f" ({r['best_over']['ok']}/{r['best_over']['tried']} lr)"))
  devices = sorted({f"{r['device']['kind']} x{r['device']['count']}" for r in best})
  commits = sorted({r["commit"][:12] for r in best})
  return (markdown_table(header, rows)
          + f"\n\nEval accuracy on {TEST_EXAMPLES:,} held-out examples ({CPU['eval_examples']:,} in the "
          "cpu setting, fewer in smoke runs), the best "
          f"of the learning rates tried ({len(LEARNING_RATES)} in the full sweep); \"(k/n lr)\" "
          f"marks a cell where only k of its n runs finished. Devices: {', '.join(devices)}; "
          f"commits: {', '.join(commits)}.")
