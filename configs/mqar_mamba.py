"""MQAR with a 2-layer Mamba (Mamba-1 mixers, no MLP, as in the Mamba paper): quickstart's task and
training settings, another model.

Sized for a CPU. Time per step: CPU (2 shared cores, 2026-12-07): ~2.5 s/step (0.8 GiB step); GPU:
not measured.
"""

import os

import ml_collections

from ssm_lab.config import load_config


def get_config() -> ml_collections.ConfigDict:
  config = load_config(os.path.join(os.path.dirname(__file__), "quickstart.py"))
  config.model.pattern = "MM"
  config.model.block_mlp = False
  return config
