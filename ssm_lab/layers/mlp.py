"""The SwiGLU feed-forward block (Shazeer 2020), as in LLaMA: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssm_lab.layers import registry


def default_d_ff(d_model: int) -> int:
  """8/3 * d_model rounded up to a multiple of 64: SwiGLU's three matrices then cost about what a
  4x GELU MLP's two do."""
  return -(-(8 * d_model // 3) // 64) * 64


class SwiGLU(nn.Module):
  """x: [batch, length, d_model] -> [batch, length, d_model]."""

  d_ff: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda feats, name: nn.Dense(feats, use_bias=False, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    h = jax.nn.silu(dense(self.d_ff, "gate")(x)) * dense(self.d_ff, "up")(x)
    return dense(x.shape[-1], "down")(h)


# Registration: pattern letter "F", an MLP-only block (no config group; its width is the model's
# d_ff). Stateless: it decodes token by token with no cache. Its parameters are the block's "mlp"
# and "mlp_norm", as for the MLP sublayer that config.model.block_mlp adds to mixer blocks.
registry.register(registry.MixerSpec(
    letter="F", name="", description="MLP-only block (SwiGLU)", paper="Shazeer 2020, arXiv 2002.05202",
    config=None,
    module=lambda args, cfg, *, name: SwiGLU(d_ff=args.ff_dim, dtype=args.compute_dtype,
                                             param_dtype=args.params_dtype, name=name),
    flops_per_token=lambda args, cfg, seq_len: 2.0 * 3 * args.d_model * args.ff_dim,
    module_name="mlp", norm_name="mlp_norm", block_mlp=False))
