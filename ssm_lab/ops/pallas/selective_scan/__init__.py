"""Pallas (Triton) GPU kernels for the Mamba-1 selective scan: `selective_scan(..., impl="pallas")`.

The hardware-aware scan of Gu & Dao 2023 (section 3.3, appendix D): a program keeps the state of its
channels in registers while it walks time, so [batch, length, d_inner, d_state] never reaches HBM.
Per token it fuses softplus(delta + delta_bias), the discretisation exp(delta A) and delta B u, the C
contraction, the D skip and the z gate. A program owns `block_d` channels of one batch row and one
time segment; grid (channel block, segment, batch).

Two kernel families, one per d_state range (`Config.kernels`; `default_config` picks):
  v6 (`v6.py`), padded d_state <= 16: one warp a program walks its tokens one by one on
    [d_state, block_d] register tiles.
  v4 (`v4.py`), above: a program scans `chunk` tokens in parallel on [chunk, block_d, state_block]
    tiles (Triton's tt.scan), folding the carried state in.
Both take the same refs and produce the same outputs, so the entry (`wrapper.py`) is shared:

Backward (`jax.custom_vjp`): the forward saves the state at the start of every `chunk` tokens
([batch, length / chunk, d_state, d_inner] float32); the backward walks chunks in reverse, recomputes
each chunk's states from its checkpoint and runs the adjoint g_t = exp(delta_{t+1} A) g_{t+1} + dy_t C_t
(dy: the gradient before the C contraction). dA, dD and d(delta_bias) are accumulated per program and
summed over batch and segments in XLA; dB and dC are written per channel block and summed in XLA.

Time segments (`segments` > 1, for calls with few channels and long sequences): a first pass runs every
segment from a zero state (forward: its end state and sum of delta; backward: the adjoint at its
start). A does not depend on time, so a segment's total decay is exp(A sum delta) and the true state
entering each segment follows from a short recurrence over segments (`wrapper._hand_over`, unrolled
into one XLA fusion); the main kernels then run all segments in parallel.

Padding: d_state to a power of two (A = 0, B = C = 0 keep padded states at zero); channels per group to
a multiple of block_d (independent, sliced away); time at the end to a multiple of chunk * segments,
where the kernels zero delta so the state passes through unchanged.

Without a GPU the kernels run in Pallas interpret mode (how CI checks them against the reference).
Design notes and what was tried: benchmarks/NOTES_selective_scan.md; the kernels deleted from here
(v3, v5, v7 and the prefetch knobs) are at the git tag kernel-lab-history (commit bf21041).
"""

from ssm_lab.ops import registry as reg
from ssm_lab.ops.selective_scan import REGISTRY
from ssm_lab.ops.pallas.selective_scan.common import (LOG2E, MAX_D_STATE, V6_BWD_WAVE, V6_MAX_D_STATE,
                                                      Config, _ex2, _fma, _log1p_from, _v6_full_waves,
                                                      default_config, supports)
from ssm_lab.ops.pallas.selective_scan.v6 import recompute_sub_chunks
from ssm_lab.ops.pallas.selective_scan.wrapper import (_hand_over, padded_sizes, selective_scan_pallas)


def _registry_fn(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus, initial_state,
                 return_final_state):
  return selective_scan_pallas(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                               delta_softplus=delta_softplus, initial_state=initial_state,
                               return_final_state=return_final_state)


REGISTRY.register(reg.Impl("pallas", _registry_fn, supports, auto_priority={"gpu": 20}))

__all__ = ["LOG2E", "MAX_D_STATE", "V6_BWD_WAVE", "V6_MAX_D_STATE", "Config", "_ex2", "_fma", "_hand_over",
           "_log1p_from", "_v6_full_waves", "default_config", "padded_sizes", "recompute_sub_chunks",
           "selective_scan_pallas", "supports"]
