"""Figures of the synthetics study: induction-heads accuracy against test length (one line per
model, the training length marked, an x where a model ran out of memory), and selective-copying
accuracy per model and learning rate beside the paper's Table 1."""

from __future__ import annotations

import os

from ssm_lab.experiments import load_file


def plot(results: list[dict], out_dir: str) -> list[str]:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  sweep = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep.py"))

  paths = []
  induction = [r for r in results if r["tags"].get("task") == "induction"]
  if induction:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for r in sorted(induction, key=sweep.induction_label):
      acc = r["metrics"]["accuracy_by_log2_length"]
      ks = sorted(int(k) for k in acc)
      line, = ax.plot([2 ** k for k in ks], [acc[str(k)] for k in ks], marker="o",
                      label=sweep.induction_label(r))
      oom = r["metrics"].get("oom_at_log2_length")
      if oom is not None:
        ax.plot([2 ** oom], [0.0], marker="x", color=line.get_color(), markersize=9,
                linestyle="none")
    for train in {r["tags"]["train_seq_len"] for r in induction}:
      ax.axvline(train, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test sequence length (dashed: training length; x: out of memory)")
    ax.set_ylabel("induction accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = os.path.join(out_dir, "induction_vs_length.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  copy = [r for r in results if r["tags"].get("task") == "copy"]
  if copy:
    models = [m for m in sweep.COPY_MODELS if any(r["tags"]["model"] == m for r in copy)]
    # One bar series per (setting, learning rate): the full setting and the CPU one side by side.
    series = sorted({(r["tags"].get("setting", "full"), r["tags"]["lr"]) for r in copy},
                    key=lambda x: (x[0] != "full", x[1]))
    lrs = series
    width = 0.8 / (len(series) + 1)
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(models), 3.2))
    for j, (setting, lr) in enumerate(series):
      hits = [r for r in copy if r["tags"].get("setting", "full") == setting and r["tags"]["lr"] == lr]
      ys = [next((100 * r["metrics"]["accuracy"] for r in hits if r["tags"]["model"] == m), 0.0)
            for m in models]
      length = hits[0]["config"]["task"]["seq_len"]
      ax.bar([i + j * width for i in range(len(models))], ys, width,
             label=f"ours ({setting}, L {length}), lr {lr:g}")
    ax.bar([i + len(lrs) * width for i in range(len(models))],
           [sweep.PAPER_COPY.get(m, 0.0) for m in models], width,
           label="paper (Table 1: L 4,096, 400K steps)",
           color="lightgray", edgecolor="gray")
    ax.set_xticks([i + width * len(lrs) / 2 for i in range(len(models))], models, fontsize=7)
    ax.set_ylabel("selective copying accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = os.path.join(out_dir, "selective_copying.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths
