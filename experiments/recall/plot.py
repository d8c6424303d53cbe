"""Figure of the recall study: MQAR accuracy against d_model, one panel per (setting, sequence
length), one line per model (best learning rate per point)."""

from __future__ import annotations

import os

from ssm_lab.experiments import best_over


def plot(results: list[dict], out_dir: str) -> list[str]:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  best = best_over(results, key="lr", metric_key="accuracy")
  panels = sorted({(r["tags"].get("setting", "full"), r["tags"]["seq_len"]) for r in best},
                  key=lambda p: (p[0] != "full", p))
  models = sorted({r["tags"]["model"] for r in best})
  fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)), 3.0),
                           sharey=True, squeeze=False)
  for ax, (setting, seq_len) in zip(axes[0], panels, strict=False):
    cell = [r for r in best if (r["tags"].get("setting", "full"), r["tags"]["seq_len"])
            == (setting, seq_len)]
    for model in models:
      points = sorted((r["tags"]["d_model"], r["metrics"]["accuracy"]) for r in cell
                      if r["tags"]["model"] == model)
      if points:
        ax.plot([d for d, _ in points], [a for _, a in points], marker="o", label=model)
    kv = cell[0]["tags"]["num_kv_pairs"]
    where = "" if setting == "full" else f" ({setting})"
    ax.set_title(f"length {seq_len}, {kv} KV pairs{where}", fontsize=9)
    ax.set_xscale("log", base=2)
    widths = sorted({r["tags"]["d_model"] for r in cell})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("d_model")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("MQAR accuracy")
  if models:
    axes[0][-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  path = os.path.join(out_dir, "accuracy_vs_d_model.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [path]
