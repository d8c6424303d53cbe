"""Summarise benchmarks/ncu_ab.sh's CSVs: per tree and shape, the median over repetitions of each
kernel's duration (the scan's Pallas kernels by name, XLA's fusions summed as "xla"), and new/old.

    python -m benchmarks.ncu_ab DIR [--json OUT.json] > table.md
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import statistics

from benchmarks import ncu_summary  # noqa: E402

UNIT_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
KERNELS = ("state", "adjoint", "fwd", "bwd", "xla")


def durations(path: pathlib.Path) -> dict[str, float]:
  """{kernel group: microseconds} of one call's --page details CSV with gpu__time_duration."""
  launches = ncu_summary.details(path)
  if not launches:
    raise ValueError(f"{path}: no ncu rows (see the .err file next to it)")
  out: dict[str, float] = collections.defaultdict(float)
  for _, name, metrics in launches:
    value, unit = metrics.get("gpu__time_duration.sum") or metrics["Duration"]
    if unit not in UNIT_US:
      raise ValueError(f"{path}: unknown duration unit {unit!r}")
    m = re.match(r"selective_scan_(\w+)", name)
    out[m.group(1) if m else "xla"] += float(value.replace(",", "")) * UNIT_US[unit]
  return dict(out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("dir", type=pathlib.Path)
  ap.add_argument("--json", type=pathlib.Path)
  opts = ap.parse_args()
  runs: dict[tuple[str, str], list[dict[str, float]]] = collections.defaultdict(list)
  for p in sorted(opts.dir.glob("*.csv")):
    m = re.fullmatch(r"(old|new)_(\w+?)_(\d+)", p.stem)
    if m:
      runs[(m.group(1), m.group(2))].append(durations(p))
  med = {k: {g: statistics.median(d.get(g, 0.0) for d in v) for g in KERNELS} for k, v in runs.items()}
  for v in med.values():
    v["total"] = sum(v[g] for g in KERNELS)
  shapes = sorted({s for _, s in med}, key=lambda s: [int(x) for x in s.split("x")])
  print("| shape | kernel | old us | new us | new / old |")
  print("| --- | --- | ---: | ---: | ---: |")
  for s in shapes:
    for g in (*KERNELS, "total"):
      o, n = med.get(("old", s), {}).get(g), med.get(("new", s), {}).get(g)
      ratio = f"{n / o:.3f}" if o and n is not None else ""
      fmt = lambda x: "" if x is None else f"{x:.1f}"  # noqa: E731
      print(f"| {s} | {g} | {fmt(o)} | {fmt(n)} | {ratio} |")
  if opts.json:
    opts.json.write_text(json.dumps({f"{t}_{s}": v for (t, s), v in med.items()}, indent=1) + "\n")


if __name__ == "__main__":
  main()
