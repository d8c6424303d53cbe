"""MQAR with a Jamba-like hybrid (Mamba, Mamba, attention, Mamba blocks, each with a SwiGLU MLP):
quickstart's task and training settings, another model.

Sized for a CPU. Time per step: CPU (2 shared cores, 2026-12-07): ~4.4 s/step (1.2 GiB step); GPU:
not measured.
"""

import os

import ml_collections

from ssm_lab.config import load_config


def get_config() -> ml_collections.ConfigDict:
  config = load_config(os.path.join(os.path.dirname(__file__), "quickstart.py"))
  config.model.pattern = "MMAM"
  config.model.block_mlp = True
  return config
