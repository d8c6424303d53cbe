"""Tables and figures of the scaling study, from its result records (one figure per part; a part
without results says "not yet measured"). The notebook notebooks/scaling.ipynb calls the same
functions."""

from __future__ import annotations

import math
import os
from typing import Any

from ssm_lab.experiments import best_over, load_file, markdown_table

NOT_MEASURED = "not yet measured"


def _part(results: list[dict], name: str) -> list[dict]:
  return [r for r in results if r.get("tags", {}).get("part") == name]


def _device(records: list[dict]) -> str:
  return ", ".join(sorted({f"{r['device']['kind']} ({r['date'][:10]}, commit {str(r['commit'])[:12]})"
                           for r in records})) or "–"


def _ms(v: Any) -> str:
  return "–" if v is None else f"{v:.3g}"


def _ops_crossovers(ops: list[dict], crossover) -> list[str]:
  by = {r["name"]: r["metrics"]["points"] for r in ops}
  lines = []
  for scan in ("ops-scan-pallas", "ops-scan-associative", "ops-ssd-pallas", "ops-ssd-chunked"):
    for att in ("ops-attention-cudnn", "ops-attention-pallas"):
      if scan in by and att in by:
        x = crossover(by[att], by[scan])
        lines.append(f"{scan[4:]} faster than {att[4:]} " + (f"from L ≈ {x:,.0f}" if x else
                                                              "at no measured length"))
  return lines


def ops_table(results: list[dict]) -> str:
  ops = _part(results, "ops")
  if not ops:
    return f"**Ops** (time and memory against length): {NOT_MEASURED}."
  mod = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops.py"))
  lengths = sorted({p["length"] for r in ops for p in r["metrics"]["points"]})
  rows = []
  for r in sorted(ops, key=lambda r: r["name"]):
    pts = {p["length"]: p for p in r["metrics"]["points"]}
    slope = r["metrics"].get("growth_exponent")
    rows.append([r["name"][4:], *(_ms(pts.get(n, {}).get("ms_pipelined")) for n in lengths),
                 "–" if slope is None else f"{slope:.2f}"])
  text = markdown_table(["unit", *(f"L={n}" for n in lengths), "exponent"], rows)
  notes = _ops_crossovers(ops, mod.crossover)
  return (f"**Ops**: forward+backward ms (pipelined) at {ops[0]['metrics']['tokens_per_batch']:,} "
          f"tokens per batch (batch 1 past that); exponent = log-log slope of time per sequence "
          f"from L = 2K. Device: {_device(ops)}.\n\n" + text
          + ("\n\n" + "; ".join(notes) + "." if notes else ""))


def train_table(results: list[dict]) -> str:
  train = _part(results, "train")
  if not train:
    return f"**Training throughput** against length: {NOT_MEASURED}."
  lengths = sorted({p["seq_len"] for r in train for p in r["metrics"]["points"]})
  rows = []
  for r in sorted(train, key=lambda r: r["name"]):
    pts = {p["seq_len"]: p for p in r["metrics"]["points"]}
    cell = lambda p: ("–" if "tokens_per_s" not in p else
                      f"{p['tokens_per_s'] / 1e3:.3g}k / {p.get('peak_memory_gib') or '?'} GiB"
                      + (" (remat)" if p.get("remat") == "block" else ""))
    rows.append([r["tags"]["size"], r["tags"]["arch"], *(cell(pts.get(n, {})) for n in lengths)])
  return (f"**Training**: tokens/s and peak memory. Device: {_device(train)}.\n\n"
          + markdown_table(["size", "arch", *(f"L={n}" for n in lengths)], rows))


def generation_tables(results: list[dict]) -> str:
  out = []
  decode = _part(results, "decode")
  imported = _part(results, "generation-import")
  rows = []
  for r in decode:
    rows += [dict(row, device=r["device"]["kind"]) for row in r["metrics"]["rows"]]
  for r in imported:
    rows += [dict(row, device=f"{r['device']['kind']} (imported)") for row in r["metrics"]["decode"]]
  good = [x for x in rows if "tokens_per_s" in x]
  if good:
    batches = sorted({x["batch"] for x in good})
    keys = sorted({(x["device"], x["model"]) for x in good})
    cells = {(x["device"], x["model"], x["batch"]): x["tokens_per_s"] for x in good}
    table = markdown_table(["device", "model", *(f"batch {b}" for b in batches)],
                           [[d, m, *(cells.get((d, m, b)) for b in batches)] for d, m in keys],
                           fmt=lambda v: "–" if v is None else (f"{v:,.0f}" if isinstance(v, float)
                                                                else str(v)))
    out.append("**Decode** tokens/s (prompt 2,048, 128 new tokens, random weights, bf16). Sources: "
               + _device(decode + imported) + ".\n\n" + table)
  else:
    out.append(f"**Decode** tokens/s against batch: {NOT_MEASURED}.")
  fits = _part(results, "fits-model")
  if fits:
    r = fits[0]["metrics"]
    rows = [[x["model"], f"{x['weight_bytes'] / 1e9:.2f}", f"{x['cache_bytes_per_token'] / 1e3:.1f}",
             "unbounded (constant state)" if x["longest_context"] is None else
             f"{x['longest_context']:,}"] for x in r["rows"]]
    out.append(f"**Longest batch-1 decoding context on {r['memory_bytes'] / 1e9:.0f} GB** "
               f"(closed form, {r['reserve']:.0%} kept free; bf16 weights and cache):\n\n"
               + markdown_table(["model", "weights GB", "cache KB / token", "longest context"],
                                rows))
  confirm = _part(results, "fits-device")
  if confirm:
    rows = [[x["model"], f"{x['context']:,}", "fits" if x.get("ok") else "fails",
             r["device"]["kind"]] for r in confirm for x in r["metrics"]["rows"]]
    out.append("Confirmed on the device:\n\n" + markdown_table(["model", "context", "decode step",
                                                               "device"], rows))
  else:
    out.append(f"Device confirmation of the longest context: {NOT_MEASURED}.")
  return "\n\n".join(out)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The compute frontier of (FLOPs, loss) points: those no cheaper point beats, cheapest first."""
  out: list[tuple[float, float]] = []
  for flops, loss in sorted(points):
    if not out or loss < out[-1][1]:
      out.append((flops, loss))
  return out


def _families(records: list[dict]) -> list[list[dict]]:
  """Quality records grouped by tokenizer (byte-level CPU sizes, GPT-NeoX GPU sizes): losses per
  token of different tokenizers are in different units, so each group has its own frontier."""
  groups: dict[str, list[dict]] = {}
  for r in records:
    groups.setdefault(r["config"]["task"]["tokenizer"], []).append(r)
  return [groups[k] for k in sorted(groups)]


def quality_table(results: list[dict]) -> str:
  quality = _part(results, "quality")
  best = best_over(quality, key="lr", metric_key="loss", mode="min")
  if not best:
    return f"**Quality per compute**: {NOT_MEASURED}."
  on_front = {p for family in _families(best)
              for p in frontier([(r["metrics"]["train_flops"], r["metrics"]["loss"]) for r in family])}
  rows = [[r["tags"]["size"], r["tags"]["arch"], f"{r['metrics']['non_embedding_params'] / 1e6:.2f}M",
           f"{r['metrics']['train_flops']:.3g}", f"{r['metrics']['loss']:.4f}",
           f"{r['metrics'].get('bits_per_byte', float('nan')):.4f}",
           f"{r['tags']['lr']:.1e} (best of {r['best_over']['tried']})"]
          + ["yes" if (r["metrics"]["train_flops"], r["metrics"]["loss"]) in on_front else ""]
          for r in sorted(best, key=lambda r: (r["metrics"]["train_flops"], r["metrics"]["loss"]))]
  return (f"**Quality per compute** (eval on held-out Gutenberg books; best learning rate; the "
          f"frontier is taken per tokenizer: byte-level CPU sizes, GPT-NeoX GPU sizes, whose losses "
          f"are in different units). Device: {_device(best)}.\n\n" + markdown_table(
              ["size", "arch", "non-emb. params", "train FLOPs", "eval loss", "bits/byte", "lr",
               "on frontier"], rows))


def edge_table(results: list[dict]) -> str:
  edge = _part(results, "edge")
  if not edge:
    return f"**Edge** (CPU decode): {NOT_MEASURED}."
  contexts = sorted({p["context"] for r in edge for p in r["metrics"]["points"]})
  rows = []
  for r in sorted(edge, key=lambda r: r["name"]):
    pts = {p["context"]: p for p in r["metrics"]["points"]}
    rows.append([r["tags"]["model"], *(
        f"{pts[c]['ms_per_token']:.0f} ms / {pts[c]['peak_rss_gib']:.2f} GiB" if c in pts else "–"
        for c in contexts)])
  m = edge[0]["metrics"]
  return (f"**Edge**: batch-1 decode ms per token (median) / peak resident memory, random weights, "
          f"float32, {edge[0]['device']['kind']} host with "
          f"{edge[0]['metrics']['points'][0].get('threads', '?')} cores shared with other jobs; budget "
          f"{m['budget_ms']:.0f} ms and {m['budget_gb']:.0f} GB. Source: {_device(edge)}.\n\n"
          + markdown_table(["model", *(f"{c // 1024}K" for c in contexts)], rows))


def table(results: list[dict]) -> str:
  return "\n\n".join([ops_table(results), train_table(results), generation_tables(results),
                      quality_table(results), edge_table(results)])


def _loglog(ax, title: str, xlabel: str, ylabel: str) -> None:
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_title(title, fontsize=9)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)


def _empty(ax, what: str) -> None:
  ax.text(0.5, 0.5, f"{what}:\n{NOT_MEASURED}", ha="center", va="center", transform=ax.transAxes)
  ax.set_xticks([])
  ax.set_yticks([])


def figure(results: list[dict], which: str):
  """One figure ("ops", "train", "decode", "quality", "edge") as a matplotlib Figure."""
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  if which == "ops":
    recs = _part(results, "ops")
    for r in recs:
      pts = [p for p in r["metrics"]["points"] if "ms_pipelined" in p]
      if pts:
        xs = [p["length"] for p in pts]
        axes[0].plot(xs, [p["ms_pipelined"] for p in pts], marker="o", label=r["name"][4:])
        axes[1].plot(xs, [p.get("memory_bytes", math.nan) / 2**30 for p in pts], marker="o")
    _loglog(axes[0], "fwd+bwd time, fixed tokens per batch", "length", "ms")
    _loglog(axes[1], "XLA memory (args + out + temp)", "length", "GiB")
  elif which == "train":
    recs = _part(results, "train")
    for r in recs:
      pts = [p for p in r["metrics"]["points"] if "tokens_per_s" in p]
      if pts:
        axes[0].plot([p["seq_len"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o",
                     label=r["name"][6:])
        axes[1].plot([p["seq_len"] for p in pts], [p.get("peak_memory_gib") or math.nan
                                                   for p in pts], marker="o")
    _loglog(axes[0], "training tokens/s", "length", "tokens/s")
    _loglog(axes[1], "peak memory", "length", "GiB")
  elif which == "decode":
    recs = _part(results, "decode") + _part(results, "generation-import")
    for r in recs:
      rows = r["metrics"]["rows"] if "rows" in r["metrics"] else r["metrics"]["decode"]
      for model in sorted({x["model"] for x in rows}):
        pts = [x for x in rows if x["model"] == model and "tokens_per_s" in x]
        if pts:
          ax = axes[1] if "1.3b" in model else axes[0]
          ax.plot([x["batch"] for x in pts], [x["tokens_per_s"] for x in pts], marker="o",
                  label=f"{model} ({r['device']['kind'].replace('NVIDIA ', '')[:4]})")
    _loglog(axes[0], "decode tokens/s, ~130M", "batch", "tokens/s")
    _loglog(axes[1], "decode tokens/s, ~1.3B", "batch", "tokens/s")
    recs = [r for r in recs if r["metrics"].get("rows") or r["metrics"].get("decode")]
  elif which == "quality":
    recs = _part(results, "quality")
    for arch in sorted({r["tags"]["arch"] for r in recs}):
      pts = sorted((r["metrics"]["train_flops"], r["metrics"]["loss"], r["metrics"].get(
          "bits_per_byte", math.nan)) for r in best_over(
              [r for r in recs if r["tags"]["arch"] == arch], key="lr", metric_key="loss",
              mode="min"))
      axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arch)
      axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o")
    for i, family in enumerate(_families(best_over(recs, key="lr", metric_key="loss", mode="min"))):
      front = frontier([(r["metrics"]["train_flops"], r["metrics"]["loss"]) for r in family])
      if len(front) > 1:
        axes[0].plot(*zip(*front, strict=True), color="k", ls="--", lw=0.8,
                     label=None if i else "frontier")
    for ax, y in zip(axes, ("eval loss", "bits per byte"), strict=True):
      ax.set_xscale("log")
      ax.set_title(f"{y} against training FLOPs", fontsize=9)
      ax.set_xlabel("training FLOPs")
      ax.grid(alpha=0.3)
  else:
    recs = _part(results, "edge")
    for r in recs:
      pts = r["metrics"]["points"]
      axes[0].plot([p["context"] for p in pts], [p["ms_per_token"] for p in pts], marker="o",
                   label=r["tags"]["model"])
      axes[1].plot([p["context"] for p in pts], [p["peak_rss_gib"] for p in pts], marker="o")
    if recs:
      axes[0].axhline(recs[0]["metrics"]["budget_ms"], color="k", ls="--", lw=0.8)
      axes[1].axhline(recs[0]["metrics"]["budget_gb"], color="k", ls="--", lw=0.8)
    _loglog(axes[0], "CPU batch-1 decode latency", "context", "ms / token")
    _loglog(axes[1], "peak resident memory", "context", "GiB")
  if not recs:
    for ax in axes:
      _empty(ax, which)
  elif axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=6)
  fig.tight_layout()
  return fig


FIGURES = ("ops", "train", "decode", "quality", "edge")


def plot(results: list[dict], out_dir: str) -> list[str]:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  paths = []
  for which in FIGURES:
    fig = figure(results, which)
    path = os.path.join(out_dir, f"{which}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
