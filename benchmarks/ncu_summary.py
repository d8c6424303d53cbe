"""Summarise Nsight Compute CSVs written by benchmarks/ncu_profile.sh into a markdown table.

    python -m benchmarks.ncu_summary DIR [--title T] > out.md

For every `<name>.csv` / `<name>_full.csv` (ncu --page details): one row per kernel with duration,
registers, occupancy, issue activity, executed instructions and spill requests. For every
`<name>_sass.csv` (ncu --page source --print-source sass): per kernel, the opcodes' shares of the
executed instructions and of the warp-stall samples, and the leading stall reasons.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import pathlib
import sys

METRICS = (("Duration", "duration"), ("Registers Per Thread", "regs"),
           ("Grid Size", "grid"), ("Block Size", "block"),
           ("Achieved Occupancy", "occ %"), ("Executed Ipc Active", "IPC"),
           ("Issue Slots Busy", "issue busy %"), ("Executed Instructions", "warp instr"),
           ("Local Memory Spilling Requests", "spill req"), ("DRAM Throughput", "DRAM %"),
           ("L1/TEX Cache Throughput", "L1 %"))


def _num(s: str) -> float:
  try:
    return float(s.replace(",", ""))
  except ValueError:
    return float("nan")


def details(path: pathlib.Path) -> list[tuple[str, str, dict[str, tuple[str, str]]]]:
  """[(launch id, kernel name, {metric: (value, unit)})] of one --page details CSV."""
  text = "".join(l for l in path.read_text(errors="replace").splitlines(True) if l.startswith('"'))
  rows = list(csv.reader(io.StringIO(text)))
  if not rows:
    return []
  hdr = rows[0]
  try:
    ki, mi, ui, vi, ii = (hdr.index(k) for k in ("Kernel Name", "Metric Name", "Metric Unit",
                                                   "Metric Value", "ID"))
  except ValueError:
    raise SystemExit(f"{path}: not an ncu --csv --page details file (header {hdr[:5]})") from None
  out: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
  for r in rows[1:]:
    if len(r) > vi and r[mi]:
      out.setdefault((r[ii], r[ki]), {})[r[mi]] = (r[vi], r[ui])
  return [(i, k, m) for (i, k), m in out.items()]


def sass(path: pathlib.Path) -> list[tuple[str, dict]]:
  """Per kernel of one --page source CSV: opcode shares of instructions and of stall samples."""
  blocks: list[tuple[str, list[str]]] = []
  for line in path.read_text(errors="replace").splitlines():
    if line.startswith('"Kernel Name"'):
      blocks.append((next(csv.reader([line]))[1], []))
    elif blocks:
      blocks[-1][1].append(line)
  out = []
  for name, lines in blocks:
    rows = list(csv.reader(lines))
    if not rows:
      continue
    hdr = rows[0]
    si, ei = hdr.index("Source"), hdr.index("Instructions Executed")
    wi = hdr.index("Warp Stall Sampling (All Samples)")
    stall_cols = [(i, h[len("stall_"):]) for i, h in enumerate(hdr)
                  if h.startswith("stall_") and "Not Issued" not in h]
    ops, samples, stalls = collections.Counter(), collections.Counter(), collections.Counter()
    for r in rows[1:]:
      if len(r) != len(hdr) or not r[si].strip():
        continue
      words = r[si].split()
      op = (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]
      ops[op] += _num(r[ei]) if r[ei] else 0.0
      samples[op] += _num(r[wi]) if r[wi] else 0.0
      for i, h in stall_cols:
        stalls[h] += _num(r[i]) if r[i] else 0.0
    out.append((name, dict(ops=ops, samples=samples, stalls=stalls)))
  return out


def _shares(c: collections.Counter, k: int) -> str:
  tot = sum(c.values()) or 1.0
  return ", ".join(f"{op} {v / tot:.0%}" for op, v in c.most_common(k))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("dir")
  ap.add_argument("--title", default="Nsight Compute summary")
  opts = ap.parse_args()
  d = pathlib.Path(opts.dir)
  if not d.is_dir():
    raise SystemExit(f"{d}: not a directory")
  lines = [f"# {opts.title}", ""]
  lines += ["| run | kernel | " + " | ".join(h for _, h in METRICS) + " |",
            "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " |"]
  for p in sorted(d.glob("*.csv")):
    if p.name.endswith("_sass.csv"):
      continue
    for _, kernel, m in details(p):
      cells = []
      for key, _ in METRICS:
        v, unit = m.get(key, ("", ""))
        cells.append(f"{v} {unit}".strip() if key == "Duration" else v)
      lines.append(f"| {p.stem} | {kernel[:40]} | " + " | ".join(cells) + " |")
  for p in sorted(d.glob("*_sass.csv")):
    for kernel, s in sass(p):
      lines += ["", f"**{p.stem} / {kernel}**", "",
                f"- executed instructions by opcode: {_shares(s['ops'], 10)}",
                f"- warp-stall samples by opcode: {_shares(s['samples'], 8)}",
                f"- stall reasons: {_shares(s['stalls'], 6)}"]
  sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
