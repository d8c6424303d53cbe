"""RankMamba's comparison (Xu 2024, arXiv 2403.18276; Mamba-2: arXiv 2412.14354) on the collections we
have: Transformer, Mamba-1, Mamba-2 and hybrid backbones of matched size, pretrained the same way on
Gutenberg, fine-tuned as cross-encoder rerankers with one recipe, and their throughput.

One run per backbone (`<backbone>`): `config` pretrains the causal LM through `ssm_lab.train`; its
`evaluate` fine-tunes that backbone on every collection and seed (`ssm_lab.train` with
`train.init_from` and the task's grouped loss: LCE and the BCE ablation) and re-ranks through `ssm_lab.rank` (the CLI's functions), writing TREC runs under
`<workdir>/runs/`. One measurement run (`throughput`) times training and scoring of each reranker at
lengths 128, 512, 2,048 with impl="auto" and the reference-style impls. Data come from
`$SSM_LAB_RANKING_CARRY` (default `.carry/ranking_data`, made by `prepare_carry.py`).
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from ssm_lab.config import base_config
from ssm_lab.experiments import Run, markdown_table, set_mixer

CARRY_ENV = "SSM_LAB_RANKING_CARRY"
UNIT_TIME_ENV = "SSM_LAB_UNIT_TIME_S"
D_MODEL = 384
# name -> (layer pattern, SwiGLU MLP after each mixer). Layer counts give ~30-31M parameters each
# (19.3M of them the 50,278 x 384 GPT-NeoX embedding); see the README table.
BACKBONES: dict[str, tuple[str, bool]] = {
    "transformer": ("A" * 6, True),
    "mamba": ("M" * 12, False),
    "mamba2": ("S" * 12, False),
    "hybrid": ("SSSA" * 3, False),   # Mamba-2 with 1 attention layer in 4
}
REFERENCE_IMPLS = {"attention": "xla", "mamba": "associative", "mamba2": "chunked"}


class Budget(NamedTuple):
  """Every size the units use; `FULL` for the H100, `SMOKE` for CI."""

  d_model: int = D_MODEL
  tokenizer: str = "gpt-neox-20b"
  pretrain_seq: int = 1024
  pretrain_batch: int = 48
  pretrain_steps: int = 800            # 800 x 48 x 1024 = 39.3M tokens (~2.8 passes of the cache)
  train_tokens: int = 14_000_000
  eval_tokens: int = 500_000
  seq_len: int = 512                   # RankMamba's --max_length
  max_query_len: int = 64
  group_size: int = 8                  # 1 positive + 7 BM25 negatives (LCE)
  groups_per_batch: int = 8
  depth: int = 100
  lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
  seeds: tuple[int, ...] = (0, 1, 2)
  epochs: float = 2.0                  # passes over the training queries per fine-tune
  folds: int = 5
  bce_seeds: tuple[int, ...] = (0, 1, 2)
  collections: tuple[str, ...] = ("scifact", "wikiqa", "vaswani")
  zero_shot: bool = True               # TREC DL20 with the SciFact models
  throughput_lengths: tuple[int, ...] = (128, 512, 2048)
  throughput_batch: int = 16
  throughput_steps: int = 5


FULL = Budget()
SMOKE = Budget(d_model=16, tokenizer="bytes", pretrain_seq=64, pretrain_batch=4, pretrain_steps=2,
               train_tokens=20_000, eval_tokens=2_000, seq_len=48, max_query_len=16, group_size=4,
               groups_per_batch=2, depth=5, lrs=(1e-3,), seeds=(0,), epochs=0.5, folds=3,
               bce_seeds=(0,), collections=("scifact", "vaswani"), throughput_lengths=(16,),
               throughput_batch=2, throughput_steps=1)
# Collections by role; the smoke test points $SSM_LAB_RANKING_CARRY at tiny stand-ins of the same names.
DATASETS = {"scifact": "beir-scifact", "wikiqa": "wikiqa", "vaswani": "vaswani",
            "dl20": "msmarco-trec-dl20"}


def carry_dirs() -> tuple[str, str]:
  root = os.path.abspath(os.environ.get(CARRY_ENV, ".carry/ranking_data"))
  return os.path.join(root, "data"), os.path.join(root, "cache")


def backbone_model(config: ml_collections.ConfigDict, name: str, d_model: int) -> None:
  pattern, mlp = BACKBONES[name]
  m = config.model
  m.pattern, m.block_mlp, m.d_model, m.dtype = pattern, mlp, d_model, "bfloat16"
  heads = max(1, d_model // 64)
  set_mixer(config, "attention", num_heads=heads, num_kv_heads=heads)
  set_mixer(config, "mamba2", head_dim=min(64, 2 * d_model))


def pretrain_config(name: str, b: Budget) -> ml_collections.ConfigDict:
  data_dir, cache_dir = carry_dirs()
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="lm", dataset="gutenberg", tokenizer=b.tokenizer, seq_len=b.pretrain_seq, seed=0,
      train_tokens=b.train_tokens, eval_tokens=b.eval_tokens, eval_sequences=64 if b is FULL else 4,
      data_dir=data_dir, cache_dir=cache_dir, progress=False))
  backbone_model(config, name, b.d_model)
  t = config.train
  t.batch_size, t.num_steps, t.learning_rate = b.pretrain_batch, b.pretrain_steps, 1e-3
  t.warmup_steps = max(1, b.pretrain_steps // 20)
  t.eval_every = t.checkpoint_every = b.pretrain_steps
  t.keep_checkpoints, t.log_every, t.progress_bar = 1, min(50, b.pretrain_steps), False
  return config


def rank_config(pretrain: ml_collections.ConfigDict, dataset: str, b: Budget, *, loss: str,
                lr: float, seed: int, steps: int, eval_split: str = "dev", fold: int = 0,
                first_stage: str = "bm25") -> ml_collections.ConfigDict:
  """The fine-tuning config: the backbone with a 1-output classifier head, RankMamba's AdamW
  (weight decay 0.01, 10% linear warmup, then decay to 0: cosine, where RankMamba's is linear)."""
  config = ml_collections.ConfigDict(pretrain.to_dict())
  data_dir, cache_dir = carry_dirs()
  config.task = ml_collections.ConfigDict(dict(
      name="ranking", dataset=dataset, tokenizer=b.tokenizer, seq_len=b.seq_len,
      max_query_len=b.max_query_len, first_stage=first_stage, rerank_depth=b.depth,
      negatives_depth=100, group_size=b.group_size, num_folds=b.folds, fold=fold,
      dev_fraction=0.1, eval_split=eval_split, num_eval_examples=b.group_size, seed=seed,
      eval_queries=8,  # the loop's own end-of-training re-ranking check; the study evaluates fully
      loss=loss, data_dir=data_dir, cache_dir=cache_dir, progress=False))
  config.seed = seed
  m = config.model
  m.head, m.num_classes, m.pooling = "classifier", 1, "last"
  t = config.train
  t.batch_size, t.num_steps, t.learning_rate = b.group_size * b.groups_per_batch, steps, lr
  # RankMamba decays linearly to 0; ssm_lab's schedule is cosine, here also to 0.
  t.warmup_steps, t.weight_decay, t.min_lr_ratio = max(1, steps // 10), 0.01, 0.0
  return config


# --- the unit: fine-tune and evaluate one pretrained backbone everywhere ---------------------------

def _task(config):
  from ssm_lab.data.ranking import build_ranking_task  # noqa: PLC0415
  return build_ranking_task(**{k: v for k, v in config.task.items() if k != "name"})


def _steps(task, b: Budget) -> int:
  return max(2, int(b.epochs * len(task.train_qids) / b.groups_per_batch))


def _model_run(scorer, task, split: str, b: Budget, desc: str):
  from ssm_lab import rank  # noqa: PLC0415
  qids = task.splits.get(split)
  first = {q: task.first_stage[q] for q in qids if q in task.first_stage}
  return rank.rerank(scorer, task.collection.queries, task.collection.docs, first, depth=b.depth,
                     progress=False, desc=desc), rank.top(first, b.depth)


def _finetune(pretrain, backbone_dir, dataset, b, *, loss, lr, seed, fold=0, first_stage="bm25"):
  """Fine-tunes the backbone pretrained in `backbone_dir` through `ssm_lab.train` (its grouped LCE /
  BCE loss, `train.init_from`), in `<backbone_dir>/finetune/<tag>`; (task, its Scorer)."""
  from ssm_lab.rank import Scorer  # noqa: PLC0415
  from ssm_lab.train import train_and_evaluate  # noqa: PLC0415
  config = rank_config(pretrain, dataset, b, loss=loss, lr=lr, seed=seed, steps=1, fold=fold,
                       first_stage=first_stage)
  task = _task(config)
  t = config.train
  t.num_steps = _steps(task, b)
  t.warmup_steps = max(1, t.num_steps // 10)
  t.eval_every = t.checkpoint_every = t.num_steps
  t.log_every = min(t.log_every, t.num_steps)
  t.init_from = os.path.abspath(backbone_dir)
  workdir = os.path.join(backbone_dir, "finetune",
                         f"{dataset}-{loss}-lr{lr:g}-s{seed}-f{fold}-{first_stage}")
  train_and_evaluate(config, workdir)
  return task, Scorer.from_workdir(workdir, batch_size=64)


def _evaluate_split(scorer, task, b, run_dir, tag, rel=1, dev_weight=None):
  """Metrics of the reranker, the first stage and their interpolation (weight from dev)."""
  from ssm_lab import rank  # noqa: PLC0415
  from ssm_lab.data.ranking.formats import write_trec_run  # noqa: PLC0415
  out = {}
  if dev_weight is None:
    dev_run, dev_first = _model_run(scorer, task, "dev", b, f"{tag} dev")
    dev_weight = rank.choose_weight(dev_run, dev_first, task.qrels, rel=rel)
    out["dev_nDCG@10"] = rank.metrics(dev_run, task.qrels, rel)["nDCG@10"]
  run, first = _model_run(scorer, task, "test", b, f"{tag} test")
  mixed = rank.interpolate(run, first, dev_weight)
  for name, r in (("rerank", run), ("bm25", first), ("interp", mixed)):
    for k, v in rank.metrics(r, task.qrels, rel).items():
      out[f"{name}_{k}"] = v
  out["interp_weight"] = dev_weight
  write_trec_run(run, os.path.join(run_dir, f"{tag}.trec"), tag=tag)
  return out


def _mean_std(per_seed: list[dict[str, float]], prefix: str) -> dict[str, float]:
  out = {}
  for k in per_seed[0]:
    values = np.asarray([m[k] for m in per_seed], np.float64)
    out[f"{prefix}.{k}.mean"] = float(values.mean())
    out[f"{prefix}.{k}.std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return out


def evaluate_backbone(workdir: str, pretrain: ml_collections.ConfigDict, b: Budget
                      ) -> dict[str, Any]:
  """Fine-tunes the pretrained backbone in `workdir` on every collection and seed; flat metrics.

  Order of work, most telling first: per collection the learning-rate choice and the LCE seeds
  (SciFact with its DL20 zero-shot, then WikiQA, then Vaswani's folds), then the BCE ablation. With
  $SSM_LAB_UNIT_TIME_S set, no piece starts after that many seconds of fine-tuning and evaluation;
  the pieces left are listed under "not_run", so a short device call still returns what it
  finished.
  """
  from ssm_lab import rank  # noqa: PLC0415
  from ssm_lab.models import param_count  # noqa: PLC0415
  from ssm_lab.runs import load_run  # noqa: PLC0415
  init = load_run(workdir).params
  run_dir = os.path.join(workdir, "runs")
  out: dict[str, Any] = {"params": int(param_count(init))}
  t0 = time.perf_counter()
  limit = float(os.environ.get(UNIT_TIME_ENV, "inf"))
  not_run: list[str] = []

  def time_left(piece: str) -> bool:
    if time.perf_counter() - t0 < limit:
      return True
    not_run.append(piece)
    return False

  chosen: dict[str, float] = {}
  for loss, seeds in (("lce", b.seeds), ("bce", b.bce_seeds)):
    for coll in b.collections:
      dataset = DATASETS[coll]
      folds = range(b.folds) if coll == "vaswani" else [0]
      if coll not in chosen:  # learning rate: the best dev nDCG@10 of seed 0 (fold 0 for Vaswani)
        dev = {}
        for lr in b.lrs:
          if not time_left(f"{coll}.lr{lr:g}"):
            continue
          task, scorer = _finetune(pretrain, workdir, dataset, b, loss="lce", lr=lr, seed=0)
          run, _ = _model_run(scorer, task, "dev", b, f"{coll} lr{lr:g}")
          dev[lr] = rank.metrics(run, task.qrels)["nDCG@10"]
          out[f"{coll}.lr_dev_nDCG@10.lr{lr:g}"] = dev[lr]
        if not dev:
          not_run.append(f"{coll}.{loss}")
          continue
        chosen[coll] = out[f"{coll}.lr"] = max(dev, key=lambda k: (dev[k], -k))
      per_seed = []
      for seed in seeds:
        if not time_left(f"{coll}.{loss}.s{seed}"):
          continue
        fold_metrics = []
        for fold in folds:
          task, scorer = _finetune(pretrain, workdir, dataset, b, loss=loss, lr=chosen[coll],
                                   seed=seed, fold=fold)
          tag = f"{coll}-{loss}-s{seed}" + (f"-f{fold}" if coll == "vaswani" else "")
          fold_metrics.append(_evaluate_split(scorer, task, b, run_dir, tag))
          if coll == "scifact" and loss == "lce" and b.zero_shot:
            zs = _zero_shot_dl20(scorer, b, run_dir, f"dl20-from-scifact-s{seed}")
            fold_metrics[-1].update(zs)
        per_seed.append({k: float(np.mean([m[k] for m in fold_metrics])) for k in fold_metrics[0]})
      if per_seed:
        out.update(_mean_std(per_seed, f"{coll}.{loss}"))
        out[f"{coll}.{loss}.seeds"] = len(per_seed)
  out["finetune_eval_s"] = time.perf_counter() - t0
  if not_run:
    out["not_run"] = not_run
  return out


def _zero_shot_dl20(scorer, b: Budget, run_dir: str, tag: str) -> dict[str, float]:
  """TREC DL20: re-rank the given BM25 top 100 (54 queries); nDCG@10 graded, MRR@10 at grade >= 2."""
  from ssm_lab import rank  # noqa: PLC0415
  from ssm_lab.data.ranking import load_collection  # noqa: PLC0415
  from ssm_lab.data.ranking.formats import write_trec_run  # noqa: PLC0415
  data_dir, _ = carry_dirs()
  c = load_collection(DATASETS["dl20"], data_dir)
  first = rank.top(c.runs["bm25_top100"], b.depth)
  qrels = {q: d for split in c.qrels.values() for q, d in split.items()}
  run = rank.rerank(scorer, c.queries, c.docs, first, depth=b.depth, progress=False, desc=tag)
  write_trec_run(run, os.path.join(run_dir, f"{tag}.trec"), tag=tag)
  out = {}
  for name, r in (("rerank", run), ("bm25", first)):
    m = rank.metrics(r, qrels, rel=2)
    out[f"dl20_{name}_nDCG@10"], out[f"dl20_{name}_MRR@10"] = m["nDCG@10"], m["MRR@10"]
  return out


def bm25_baseline(b: Budget) -> dict[str, float]:
  """BM25 alone on every evaluation split the rerankers see (CPU; no model): the first stage they
  must beat. Vaswani: the mean over its folds' test queries, as for the rerankers."""
  from ssm_lab import rank  # noqa: PLC0415
  pretrain = pretrain_config("transformer", b)
  out: dict[str, float] = {}
  for coll in b.collections:
    folds = range(b.folds) if coll == "vaswani" else [0]
    per_fold = []
    for fold in folds:
      task = _task(rank_config(pretrain, DATASETS[coll], b, loss="lce", lr=1e-3, seed=0, steps=1,
                               fold=fold))
      qids = task.splits.get("test")
      first = rank.top({q: task.first_stage[q] for q in qids if q in task.first_stage}, b.depth)
      per_fold.append(rank.metrics(first, task.qrels))
    for k in per_fold[0]:
      out[f"{coll}.bm25_{k}"] = float(np.mean([m[k] for m in per_fold]))
  if b.zero_shot:
    from ssm_lab.data.ranking import load_collection  # noqa: PLC0415
    c = load_collection(DATASETS["dl20"], carry_dirs()[0])
    qrels = {q: d for split in c.qrels.values() for q, d in split.items()}
    for k, v in rank.metrics(rank.top(c.runs["bm25_top100"], b.depth), qrels, rel=2).items():
      out[f"dl20.bm25_{k}"] = v
  return out


# --- throughput --------------------------------------------------------------------------------------

def throughput(b: Budget, backbones: tuple[str, ...]) -> dict[str, float]:
  """Training (LCE step) and scoring examples/s of each reranker per length and impl setting."""
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ssm_lab import train as train_lib  # noqa: PLC0415
  from ssm_lab.models import build_model  # noqa: PLC0415
  out: dict[str, float] = {}
  for name in backbones:
    for impls in ("auto", "reference"):
      config = base_config()
      backbone_model(config, name, b.d_model)
      if impls == "reference":
        for group, impl in REFERENCE_IMPLS.items():
          set_mixer(config, group, impl=impl)
      config.model.head, config.model.num_classes = "classifier", 1
      model = build_model(config.model, vocab_size=50_278 if b is FULL else 259, num_classes=1)
      for length in b.throughput_lengths:
        n = b.throughput_batch
        x = jnp.ones((n, length), jnp.int32)
        mask = jnp.ones((n, length), jnp.float32)
        params = model.init(jax.random.PRNGKey(0), x[:1], pad_mask=mask[:1])["params"]
        # The training loop's own step (AdamW, the grouped LCE loss over groups of min(n, 8) rows).
        tx = train_lib.make_optimizer(config.train, config.model.pattern)
        zero = jnp.zeros((), jnp.int32)
        state = train_lib.TrainState(step=zero, params=params, opt_state=tx.init(params),
                                     skipped=zero, consecutive_bad=zero)
        batch = {"inputs": x, "pad_mask": mask, "labels": jnp.zeros((n,), jnp.int32)}
        step = jax.jit(functools.partial(train_lib.train_step, model=model, kind="group_ranking",
                                         tx=tx, accum=1, group=("lce", min(n, 8))))
        score = jax.jit(lambda p: model.apply({"params": p}, x, pad_mask=mask))
        key = f"{name}.{impls}.L{length}"
        for what, fn in (("train", lambda: step(state, batch)), ("infer", lambda: score(params))):
          jax.block_until_ready(fn())  # compile
          start = time.perf_counter()
          for _ in range(b.throughput_steps):
            res = fn()
          jax.block_until_ready(res)
          out[f"{key}.{what}_examples_per_s"] = n * b.throughput_steps / (time.perf_counter() - start)
  return out


def runs(smoke: bool = False) -> list[Run]:
  b = SMOKE if smoke else FULL
  names = ("mamba2",) if smoke else tuple(BACKBONES)
  out = []
  for name in names:
    config = pretrain_config(name, b)
    out.append(Run(name=name, config=config,
                   evaluate=lambda workdir, config, b=b: evaluate_backbone(workdir, config, b),
                   tags=dict(backbone=name, pattern=BACKBONES[name][0], kind="reranker")))
  out.append(Run(name="throughput", fn=lambda: throughput(b, names),
                 tags=dict(kind="throughput")))
  out.append(Run(name="bm25", fn=lambda: bm25_baseline(b), tags=dict(kind="bm25")))
  return out


def table(results: list[dict]) -> str:
  from ssm_lab.experiments import load_results  # noqa: F401,PLC0415 (re-exported helpers)
  rows = []
  backbones = [r for r in results if r["tags"].get("kind") == "reranker"]
  bm25 = [r["metrics"] for r in results if r["tags"].get("kind") == "bm25"]
  if not backbones and not bm25:
    return "No finished runs yet."
  if bm25:
    m = bm25[0]

    def cell(key):
      return f"{m[key]:.3f}" if key in m else "–"
    rows.append(["BM25 (first stage)", "–", "–", "–", cell("scifact.bm25_nDCG@10"), "–", "–",
                 cell("scifact.bm25_R@100"), cell("dl20.bm25_nDCG@10"), cell("wikiqa.bm25_MAP"),
                 cell("wikiqa.bm25_MRR@10"), cell("vaswani.bm25_nDCG@10")])

  def pm(m, key):
    if f"{key}.mean" not in m:
      return "–"
    return f"{m[key + '.mean']:.3f} ± {m[key + '.std']:.3f}"
  for r in sorted(backbones, key=lambda r: r["name"]):
    m = r["metrics"]
    rows.append([r["name"], f"{m.get('params', 0) / 1e6:.1f}M", f"{m.get('perplexity', float('nan')):.1f}",
                 f"{m.get('bits_per_byte', float('nan')):.3f}",
                 pm(m, "scifact.lce.rerank_nDCG@10"), pm(m, "scifact.lce.interp_nDCG@10"),
                 pm(m, "scifact.bce.rerank_nDCG@10"), pm(m, "scifact.lce.rerank_R@100"),
                 pm(m, "scifact.lce.dl20_rerank_nDCG@10"), pm(m, "wikiqa.lce.rerank_MAP"),
                 pm(m, "wikiqa.lce.rerank_MRR@10"), pm(m, "vaswani.lce.rerank_nDCG@10")])
  header = ["backbone", "params", "val ppl", "val bpb", "SciFact nDCG@10 (LCE)", "+BM25 interp",
            "SciFact nDCG@10 (BCE)", "SciFact R@100", "DL20 nDCG@10 (zero-shot)", "WikiQA MAP",
            "WikiQA MRR@10", "Vaswani nDCG@10 (5-fold)"]
  text = markdown_table(header, rows, fmt=str)
  devices = sorted({f"{r['device']['kind']} x{r['device']['count']}" for r in backbones})
  text += (f"\n\nMean ± sample std over seeds (LCE/BCE: {len(FULL.seeds)}/{len(FULL.bce_seeds)} in "
           "the full sweep). BM25: the first-stage run every reranker re-ranks (top 100), on the "
           "same test queries (DL20: the provided run, nDCG@10 graded, MRR@10 at grade >= 2)."
           + (f" Devices: {', '.join(devices)}." if devices else ""))
  for r in sorted(backbones, key=lambda r: r["name"]):
    m = r["metrics"]
    seeds = {k.split(".")[0] + " " + k.split(".")[1].upper(): v for k, v in m.items()
             if k.endswith(".seeds")}
    if m.get("not_run") or any(v < len(FULL.seeds) for v in seeds.values()):
      text += (f"\n\n{r['name']}: seeds per cell " + ", ".join(f"{k} {v}" for k, v in seeds.items())
               + "; not run within the unit's time limit: " + (", ".join(m.get("not_run", [])) or "–")
               + ".")
  tp = [r for r in results if r["tags"].get("kind") == "throughput"]
  if tp:
    m = tp[0]["metrics"]
    keys = sorted({k.rsplit(".", 1)[0] for k in m})
    trows = [[k, f"{m[k + '.train_examples_per_s']:.1f}", f"{m[k + '.infer_examples_per_s']:.1f}"]
             for k in keys if k + ".train_examples_per_s" in m]
    text += ("\n\nThroughput (examples/s, batch " + str(FULL.throughput_batch) + ", bf16, "
             + tp[0]["device"]["kind"] + "):\n\n"
             + markdown_table(["backbone.impls.length", "train", "inference"], trows, fmt=str))
  return text
