"""Where datasets and caches live, and the errors that say what is available.

Data: a task's `data_dir` field; empty means `$SSM_LAB_DATA_DIR`, else `../shared/data` next to the
repository root, else `../shared/data` relative to the working directory. A dataset is a sub-folder of
that directory (`gutenberg`, `beir-scifact`, ...) or any path to a folder in one of the supported
layouts, so a user can point ssm_lab at a copy of their own.

Caches (token caches, trained tokenizers, BM25 indexes): a task's `cache_dir` field; empty means
`$SSM_LAB_CACHE_DIR`, else `~/.cache/ssm_lab`. Never under the repository unless the user asks for a
git-ignored path there (for example `.carry/cache`, which travels to the GPU machine).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

DATA_ENV = "SSM_LAB_DATA_DIR"
CACHE_ENV = "SSM_LAB_CACHE_DIR"
# Folders of the data directory that hold no dataset.
_NOT_DATASETS = {"tokenizers"}
_DOC_SUFFIXES = {".md", ".txt.md"}


def repo_root() -> Path:
  """The repository root (the folder holding the `ssm_lab` package)."""
  return Path(__file__).resolve().parents[2]


def data_root_candidates(data_dir: str = "") -> list[Path]:
  """The folders tried, in order, for the data directory."""
  if data_dir:
    return [Path(data_dir).expanduser()]
  out = []
  if os.environ.get(DATA_ENV):
    out.append(Path(os.environ[DATA_ENV]).expanduser())
  out += [repo_root().parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
  return out


def data_root(data_dir: str = "", *, required: bool = True) -> Path | None:
  """The data directory (see the module docstring), or None when none exists and not `required`.

  Raises:
    ValueError: no candidate folder exists (and `required`); the message lists what was tried.
  """
  tried = data_root_candidates(data_dir)
  for p in tried:
    if p.is_dir():
      return p
  if not required:
    return None
  raise ValueError(f"no data directory: tried {[str(p) for p in tried]}; set the task field "
                   f"data_dir or ${DATA_ENV} to the folder that holds the datasets")


def available_datasets(root: Path | None) -> list[str]:
  """Dataset folder names under `root` (sorted); empty if `root` is None."""
  if root is None or not root.is_dir():
    return []
  return sorted(p.name for p in root.iterdir()
                if p.is_dir() and p.name not in _NOT_DATASETS and not p.name.startswith("."))


def resolve_dataset(name: str, data_dir: str = "") -> Path:
  """The folder of dataset `name`: a sub-folder of the data directory, or a path to a folder.

  Raises:
    ValueError: the dataset does not exist; the message lists the datasets that do.
  """
  if not name:
    raise ValueError("the task field 'dataset' is empty; name a dataset folder or give a path")
  as_path = Path(name).expanduser()
  if not is_plain_name(name) and as_path.is_dir():
    return as_path
  root = data_root(data_dir, required=False)
  if root is not None and (root / name).is_dir() and name not in _NOT_DATASETS:
    return root / name
  where = str(root) if root is not None else f"(no data directory: tried "\
      f"{[str(p) for p in data_root_candidates(data_dir)]})"
  raise ValueError(f"dataset {name!r} not found in {where}; available: "
                   f"{available_datasets(root)}; or give the path of a folder in a supported "
                   f"layout (see ssm_lab/data/README.md)")


def cache_root(cache_dir: str = "") -> Path:
  """The cache directory (created on first use by whoever writes there)."""
  if cache_dir:
    return Path(cache_dir).expanduser()
  if os.environ.get(CACHE_ENV):
    return Path(os.environ[CACHE_ENV]).expanduser()
  return Path.home() / ".cache" / "ssm_lab"


def is_plain_name(dataset: str) -> bool:
  """True when `dataset` names a folder of the data directory rather than giving a path."""
  return bool(dataset) and os.sep not in dataset and not dataset.startswith((".", "~"))


def dataset_key(dataset: str) -> str:
  """A short name for caches: the dataset's name, or for a path the folder name plus a hash of the
  absolute path (two user folders both called `data` must not share a cache). Computed from the
  config string alone, so a machine with the caches but without the raw data finds them."""
  if is_plain_name(dataset):
    return dataset
  path = Path(dataset).expanduser().resolve()
  return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def files_fingerprint(files: Iterable[Path], base: Path) -> str:
  """A hash of file names (relative to `base`) and sizes: what changes when the data changes, and
  what survives copying the folder elsewhere (modification times do not)."""
  h = hashlib.sha256()
  for f in sorted(files):
    h.update(f"{f.relative_to(base)}\0{f.stat().st_size}\n".encode())
  return h.hexdigest()[:12]


def data_files(folder: Path) -> list[Path]:
  """Every regular file under `folder` except documentation (README, PROVENANCE, *.md)."""
  out = []
  for p in sorted(folder.rglob("*")):
    if p.is_file() and p.suffix.lower() not in _DOC_SUFFIXES and not p.name.startswith("."):
      out.append(p)
  return out
