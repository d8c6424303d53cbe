"""Puts tests/ on sys.path so test files can share helpers (tests/lm_helpers.py) under pytest's
importlib import mode."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
