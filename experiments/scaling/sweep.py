"""Scaling study (draft): edge units only."""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

from ssm_lab.experiments import Run

HERE = os.path.dirname(os.path.abspath(__file__))


def _module(name: str):
  key = f"ssm_lab_study_scaling_{name}"
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(key, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  return sys.modules[key]


def runs(smoke: bool = False) -> list[Run]:
  edge = _module("edge")
  contexts = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
  return [Run(name=f"edge-{m}", fn=functools.partial(edge.sweep_model, m, contexts, 8),
              tags=dict(part="edge", model=m)) for m in edge.MODELS]
