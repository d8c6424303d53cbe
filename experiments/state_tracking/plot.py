"""Figure of the state_tracking study: the smallest depth reaching 90% per-position accuracy against
sequence length, one panel per group, one line per model, one figure per setting; a search that found
no depth up to its cap is drawn at cap + 1 with an open marker."""

from __future__ import annotations

import os


def plot(results: list[dict], out_dir: str) -> list[str]:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  done = [r for r in results if "accuracy_by_depth" in r.get("metrics", {})]
  paths = []
  for setting in sorted({r["tags"]["setting"] for r in done}):
    rows = [r for r in done if r["tags"]["setting"] == setting]
    groups = sorted({r["tags"]["group"] for r in rows})
    models = sorted({r["tags"]["model"] for r in rows})
    cap = max(r["tags"]["max_depth"] for r in rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 3.0), sharey=True,
                             squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    for ax, group in zip(axes[0], groups, strict=False):
      for i, model in enumerate(models):
        points = sorted((r["tags"]["seq_len"], r["metrics"]["min_depth"], r["tags"]["max_depth"])
                        for r in rows if r["tags"]["group"] == group and r["tags"]["model"] == model)
        if not points:
          continue
        shift = 2 ** (0.08 * (i - (len(models) - 1) / 2))  # models side by side where they tie
        xs = [p[0] * shift for p in points]
        ys = [p[1] if p[1] is not None else p[2] + 1 for p in points]
        ax.plot(xs, ys, marker="o", color=colors[model], alpha=0.85,
                linestyle="-" if len(points) > 1 else "none")
        missed = [(x, y) for x, y, p in zip(xs, ys, points, strict=True) if p[1] is None]
        if missed:
          ax.plot(*zip(*missed, strict=True), marker="o", linestyle="none", markerfacecolor="white",
                  color=colors[model], markersize=8)
      ax.set_title(group, fontsize=9)
      ax.set_xscale("log", base=2)
      lengths = sorted({r["tags"]["seq_len"] for r in rows})
      ax.set_xticks(lengths, [str(n) for n in lengths])
      ax.set_xlim(min(lengths) / 1.5, max(lengths) * 1.5)
      ax.minorticks_off()
      ax.set_xlabel("sequence length")
      ax.set_yticks(range(1, cap + 2), [*map(str, range(1, cap + 1)), f">{cap}"])
      ax.set_ylim(0.5, cap + 1.5)
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("min depth for 90% accuracy")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", label=m) for m in models]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(f"setting {setting}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"min_depth_vs_length_{setting}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths
