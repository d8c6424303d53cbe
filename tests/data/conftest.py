"""Fixtures for the data tests: a private data directory and cache per test (never ~/.cache)."""

from __future__ import annotations

import pytest


@pytest.fixture
def dirs(tmp_path, monkeypatch):
  """(data_dir, cache_dir), both empty, set as $SSM_LAB_DATA_DIR / $SSM_LAB_CACHE_DIR."""
  data, cache = tmp_path / "data", tmp_path / "cache"
  data.mkdir()
  monkeypatch.setenv("SSM_LAB_DATA_DIR", str(data))
  monkeypatch.setenv("SSM_LAB_CACHE_DIR", str(cache))
  return data, cache
