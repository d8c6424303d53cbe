"""Result records of a study (one JSON file per run) and the helpers that turn them into tables.

A record: {name, study, status ("ok" | "failed"), error, tags, config, metrics, wall_s, device, date,
commit, versions}. Records are written atomically, so an interrupted sweep never leaves half a file.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import re
import subprocess
import tempfile
from typing import Any, Callable, Iterable, Sequence

TABLE_START = "<!-- results-table:start -->"
TABLE_END = "<!-- results-table:end -->"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def result_path(results_dir: str, name: str) -> str:
  return os.path.join(results_dir, f"{name}.json")


def write_result(results_dir: str, record: dict[str, Any]) -> str:
  """Writes `record` to `<results_dir>/<name>.json` through a temporary file and a rename."""
  os.makedirs(results_dir, exist_ok=True)
  path = result_path(results_dir, record["name"])
  fd, tmp = tempfile.mkstemp(prefix=f".{record['name']}.", suffix=".tmp", dir=results_dir)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(record, f, indent=2, sort_keys=False, default=_json_default)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def _json_default(value: Any) -> Any:
  if hasattr(value, "item"):  # NumPy and JAX scalars
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def read_result(results_dir: str, name: str) -> dict[str, Any] | None:
  """The record of run `name`, or None when it has none."""
  path = result_path(results_dir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path} is not valid JSON ({err}); delete it to rerun that run") from err


def load_results(results_dir: str, status: str | None = "ok") -> list[dict[str, Any]]:
  """Every record in `results_dir` (sorted by name), only those with `status` unless it is None."""
  if not os.path.isdir(results_dir):
    return []
  out = []
  for fname in sorted(os.listdir(results_dir)):
    if fname.endswith(".json") and not fname.startswith("."):
      record = read_result(results_dir, fname[:-5])
      if record is not None and (status is None or record.get("status") == status):
        out.append(record)
  return out


# Provenance.

@functools.cache
def git_commit() -> str:
  """$GIT_COMMIT if set (copies whose git metadata may be stale), else `git rev-parse HEAD` of this
  checkout with "+dirty" when tracked files have changes, else "unknown"."""
  if os.environ.get("GIT_COMMIT"):
    return os.environ["GIT_COMMIT"]
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                           capture_output=True, text=True, check=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return (head or "unknown") + ("+dirty" if dirty and head else "")


def device_info() -> dict[str, Any]:
  import jax  # noqa: PLC0415

  devices = jax.devices()
  return {"backend": jax.default_backend(), "kind": devices[0].device_kind, "count": len(devices),
          "processes": jax.process_count()}


def versions() -> dict[str, str]:
  import flax  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# Tables.

def metric(record: dict[str, Any], key: str) -> float | None:
  """`record["metrics"][key]`, or `record["tags"][key]`, or None."""
  for part in ("metrics", "tags"):
    if key in record.get(part, {}):
      return record[part][key]
  return None


def best_over(results: Iterable[dict[str, Any]], key: str = "lr", metric_key: str = "accuracy",
              mode: str = "max") -> list[dict[str, Any]]:
  """One record per group of `results` that differ only in `tags[key]` (e.g. the learning rate): the
  one with the best `metrics[metric_key]`. Failed runs and runs without the metric are ignored.

  Each returned record is a copy with `best_over = {"key", "values", "tried", "ok"}` added (the
  values of `key` tried in its group, how many, how many finished), so a table can say "best of 4".
  """
  if mode not in ("max", "min"):
    raise ValueError(f"best_over: mode={mode!r} must be 'max' or 'min'")
  groups: dict[str, list[dict[str, Any]]] = {}
  for record in results:
    rest = {k: v for k, v in record.get("tags", {}).items() if k != key}
    groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(record)
  out = []
  for members in groups.values():
    scored = [r for r in members if r.get("status") == "ok" and _finite(r.get("metrics", {})
                                                                        .get(metric_key))]
    if not scored:
      continue
    sign = 1 if mode == "max" else -1
    best = max(scored, key=lambda r: sign * r["metrics"][metric_key])
    best = dict(best, best_over={"key": key, "values": sorted({r["tags"].get(key) for r in members},
                                                              key=str),
                                 "tried": len(members), "ok": len(scored)})
    out.append(best)
  return sorted(out, key=lambda r: r["name"])


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]],
                   fmt: Callable[[Any], str] | None = None) -> str:
  """A markdown table; cells are formatted by `fmt` (default: floats to 3 significant digits,
  None as an en dash)."""
  fmt = fmt or _cell
  lines = ["| " + " | ".join(str(h) for h in header) + " |",
           "| " + " | ".join("---" for _ in header) + " |"]
  lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _cell(value: Any) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.3g}"
  return str(value)


def pivot(results: Iterable[dict[str, Any]], rows: Sequence[str], col: str,
          value: Callable[[dict[str, Any]], Any]) -> tuple[list[str], list[list[Any]]]:
  """(header, rows) of a table with one row per distinct `tags[rows]` and one column per distinct
  `tags[col]` (numbers sorted numerically), cells `value(record)`; missing cells are None."""
  results = list(results)
  cols = sorted({r["tags"].get(col) for r in results}, key=_sort_key)
  keys = sorted({tuple(r["tags"].get(k) for k in rows) for r in results},
                key=lambda t: tuple(_sort_key(v) for v in t))
  cells = {(tuple(r["tags"].get(k) for k in rows), r["tags"].get(col)): value(r) for r in results}
  header = [*rows, *(f"{col}={c}" for c in cols)]
  return header, [[*key, *(cells.get((key, c)) for c in cols)] for key in keys]


def _sort_key(value: Any) -> tuple[int, Any]:
  return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def replace_table_block(text: str, table: str, where: str = "README") -> str:
  """`text` with the part between TABLE_START and TABLE_END replaced by `table`."""
  pattern = re.compile(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), re.S)
  if not pattern.search(text):
    raise ValueError(f"{where} has no {TABLE_START} ... {TABLE_END} block to hold the table")
  return pattern.sub(lambda _: f"{TABLE_START}\n{table.strip()}\n{TABLE_END}", text, count=1)


def rewrite_readme_table(readme: str, table: str) -> None:
  """Rewrites the results-table block of the file `readme` in place (atomically)."""
  with open(readme) as f:
    text = f.read()
  new = replace_table_block(text, table, where=readme)
  fd, tmp = tempfile.mkstemp(prefix=".README.", dir=os.path.dirname(os.path.abspath(readme)))
  with os.fdopen(fd, "w") as f:
    f.write(new)
  os.replace(tmp, readme)
