"""Which pins of a requirements file the running Python already satisfies (name==version, extras
ignored; `-r` includes followed). Used on the GPU image, which has no index to install from.

  python -m benchmarks.check_requirements requirements-cuda.txt
"""

from __future__ import annotations

import importlib.metadata as md
import pathlib
import re
import sys


def pins(path: pathlib.Path) -> list[str]:
  out = []
  for line in path.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line.startswith("-r "):
      out += pins(path.parent / line[3:].strip())
    elif line:
      out.append(line)
  return out


def main(path: str) -> int:
  missing = 0
  for req in pins(pathlib.Path(path)):
    m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", req)
    if not m:
      print(f"?        {req}")
      continue
    name, _, want = m.groups()
    try:
      have = md.version(name)
    except md.PackageNotFoundError:
      have = None
    ok = have == want
    missing += not ok
    print(f"{'ok' if ok else 'MISSING' if have is None else 'OTHER':8s} {req:32s} installed: {have}")
  return 0 if missing == 0 else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "requirements-cuda.txt"))
