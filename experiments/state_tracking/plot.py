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
    for ax, group in zip(axes[0], groups):
      for i, model in enumerate(models):
        points = sorted((r["tags"]["seq_len"], r["metrics"]["min_depth"], r["tags"]["max_depth"])
                        for r in rows if r["tags"]["group"] == group and r["tags"]["model"] == model)
        if not points:
          continue
        xs = [p[0] for p in points]
        ys = [p[1] if p[1] is not None else p[2] + 1 for p in points]
        line, = ax.plot(xs, ys, marker="o", label=model, alpha=0.85,
                        linestyle="-" if len(points) > 1 else "none")
        missed = [(x, y) for (x, found, _), y in zip(points, ys) if found is None]
        if missed:
          ax.plot(*zip(*missed), marker="o", linestyle="none", markerfacecolor="white",
                  color=line.get_color(), markersize=8 + i)
      ax.set_title(group, fontsize=9)
      ax.set_xscale("log", base=2)
      lengths = sorted({r["tags"]["seq_len"] for r in rows})
      ax.set_xticks(lengths, [str(n) for n in lengths])
      ax.minorticks_off()
      ax.set_xlabel("sequence length")
      ax.set_yticks(range(1, cap + 2), [*map(str, range(1, cap + 1)), f">{cap}"])
      ax.set_ylim(0.5, cap + 1.5)
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("min depth for 90% accuracy")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"setting {setting}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"min_depth_vs_length_{setting}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths
