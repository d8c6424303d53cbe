"""Figures of the ranking study: nDCG@10 per backbone and collection (mean ± std over seeds) beside
BM25 alone, and
training/scoring throughput against input length."""

from __future__ import annotations

import os

COLUMNS = [("scifact.lce.rerank_nDCG@10", "SciFact"), ("scifact.lce.dl20_rerank_nDCG@10", "DL20 0-shot"),
           ("wikiqa.lce.rerank_nDCG@10", "WikiQA"), ("vaswani.lce.rerank_nDCG@10", "Vaswani")]
BM25_KEYS = ["scifact.bm25_nDCG@10", "dl20.bm25_nDCG@10", "wikiqa.bm25_nDCG@10", "vaswani.bm25_nDCG@10"]


def plot(results: list[dict], out_dir: str) -> list[str]:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  paths = []
  backbones = sorted((r for r in results if r["tags"].get("kind") == "reranker"),
                     key=lambda r: r["name"])
  bm25 = next((r["metrics"] for r in results if r["tags"].get("kind") == "bm25"), None)
  bars = ([("BM25", [bm25.get(k, 0.0) for k in BM25_KEYS], [0.0] * len(COLUMNS))] if bm25 else [])
  bars += [(r["name"], [r["metrics"].get(f"{k}.mean", 0.0) for k, _ in COLUMNS],
            [r["metrics"].get(f"{k}.std", 0.0) for k, _ in COLUMNS]) for r in backbones]
  fig, ax = plt.subplots(figsize=(6.4, 3.0))
  width = 0.8 / max(1, len(bars))
  for i, (name, means, stds) in enumerate(bars):
    ax.bar([j + i * width for j in range(len(COLUMNS))], means, width, yerr=stds, label=name,
           color="0.6" if name == "BM25" else None)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(COLUMNS))], [c for _, c in COLUMNS])
  ax.set_ylabel("nDCG@10 (rerank BM25 top 100)")
  if bars:
    ax.legend(fontsize=7)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "ndcg_by_backbone.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  tp = [r for r in results if r["tags"].get("kind") == "throughput"]
  fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.0))
  if tp:
    m = tp[0]["metrics"]
    series: dict[str, list[tuple[int, float, float]]] = {}
    for k, v in m.items():
      if k.endswith(".train_examples_per_s"):
        name, impls, length = k.split(".")[:3]
        series.setdefault(f"{name} ({impls})", []).append(
            (int(length[1:]), v, m[k.replace("train_", "infer_")]))
    for label, pts in sorted(series.items()):
      pts.sort()
      style = "-" if "auto" in label else ":"
      axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
      axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=label)
  for ax, title in zip(axes, ("training", "inference"), strict=True):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("input length (tokens)")
    ax.set_title(f"{title} examples/s", fontsize=9)
    ax.grid(alpha=0.3)
  if tp:
    axes[1].legend(fontsize=6)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "throughput.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths
