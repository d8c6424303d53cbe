"""Pallas GPU kernels. Each module registers its impl with its op's registry on import.

On a machine without a GPU the kernels run in Pallas interpret mode (how CI tests them); `impl="auto"`
only picks them on a GPU.
"""

import jax


def interpret_mode() -> bool:
  """True when Pallas kernels must run in interpret mode (no GPU backend)."""
  return jax.default_backend() != "gpu"
from ssm_lab.ops.pallas import ssd as _ssd  # noqa: F401,E402
from ssm_lab.ops.pallas import attention as _attention  # noqa: F401,E402
from ssm_lab.ops.pallas import selective_scan as _selective_scan  # noqa: F401,E402
