"""Flax linen layers: norms, MLP, attention and SSM mixers. Each is a readable module with shapes in
its docstring; the heavy lifting happens in `ssm_lab.ops`."""

from ssm_lab.layers.attention import CausalSelfAttention
from ssm_lab.layers.mamba import MambaMixer
from ssm_lab.layers.mlp import SwiGLU
from ssm_lab.layers.norm import RMSNorm

__all__ = ["CausalSelfAttention", "MambaMixer", "RMSNorm", "SwiGLU"]
