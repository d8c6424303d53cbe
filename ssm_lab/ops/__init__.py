"""Sequence-mixing ops: one public function per op, each with an `impl=` switch.

Importing this package registers every implementation (the Pallas kernels register themselves from
`ssm_lab.ops.pallas`), so `impl="auto"` sees all of them.
"""

from ssm_lab.ops.attention import attention, attention_decode
from ssm_lab.ops.selective_scan import selective_scan
from ssm_lab.ops.ssd import ssd
from ssm_lab.ops import pallas as _pallas  # noqa: F401  (registers the Pallas impls)

__all__ = ["attention", "attention_decode", "selective_scan", "ssd"]
