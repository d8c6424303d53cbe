"""A5 word problem (Merrill, Petty & Sabharwal 2024): running products of even permutations of 5 items,
60 tokens; the smallest non-solvable group. Same model and schedule as configs/s5.py.

Sized for a CPU. Time per step: CPU: not measured (same model as s5.py, twice the length); GPU: not
measured.
"""

import os

import ml_collections

from ssm_lab.config import load_config


def get_config() -> ml_collections.ConfigDict:
  config = load_config(os.path.join(os.path.dirname(__file__), "s5.py"))
  config.task.group = "A5"
  return config
