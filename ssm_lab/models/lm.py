"""`LanguageModel`: one stack for Transformers, Mamba, Mamba-2 and hybrids, built from a layer pattern.

Each letter of `pattern` is one pre-norm residual block (`ssm_lab.config.LAYER_LETTERS`):
  A  causal self-attention     M  Mamba-1 mixer     S  Mamba-2 mixer     F  SwiGLU MLP only
With `block_mlp`, every mixer block also gets a SwiGLU sublayer (Transformer / Jamba style). So
"AAAA" + block_mlp is a LLaMA-style Transformer, "MMMM" a Mamba, "MMMAMMMM" + block_mlp a Jamba-like
hybrid, and "SFSFSA" a Nemotron-H-like stack.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssm_lab.layers.attention import CausalSelfAttention
from ssm_lab.layers.mamba import MambaMixer
from ssm_lab.layers.mlp import SwiGLU, default_d_ff
from ssm_lab.layers.norm import RMSNorm

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
  """The fields of `config.model` (see ssm_lab.config.model_defaults), resolved and hashable."""

  pattern: str
  d_model: int
  vocab_size: int
  block_mlp: bool = False
  d_ff: int = 0
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  rope_theta: float = 10000.0
  sliding_window: int = 0
  attention_impl: str = "auto"
  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  dt_rank: int = 0
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  scan_impl: str = "auto"
  ssd_d_state: int = 64
  ssd_head_dim: int = 64
  ssd_n_groups: int = 1
  ssd_chunk_size: int = 64
  ssd_impl: str = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"
  head: str = "lm"
  num_classes: int = 0
  pooling: str = "last"
  remat: str = "none"

  @classmethod
  def from_config(cls, model_cfg: Any, *, vocab_size: int | None = None,
                  num_classes: int | None = None) -> "ModelArgs":
    """From `config.model`; a vocab_size of -1 (num_classes 0) takes the task's value given here."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(model_cfg).items() if k in fields}
    if kw.get("vocab_size", -1) in (-1, None):
      if vocab_size is None:
        raise ValueError("config.model.vocab_size is -1 (take the task's) but no task vocab given")
      kw["vocab_size"] = vocab_size
    if not kw.get("num_classes") and num_classes:
      kw["num_classes"] = num_classes
    return cls(**kw)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def attn_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def ff_dim(self) -> int:
    return self.d_ff or default_d_ff(self.d_model)


class Block(nn.Module):
  """One pre-norm residual block: x + mixer(norm(x)) [+ mlp(norm(.))]. x: [batch, length, d_model]."""

  args: ModelArgs
  letter: str

  def _mixer(self) -> nn.Module:
    a, dt, pdt = self.args, self.args.compute_dtype, self.args.params_dtype
    if self.letter == "A":
      return CausalSelfAttention(a.num_heads, a.num_kv_heads, a.attn_head_dim, a.rope_theta,
                                 a.sliding_window, a.attention_impl, dt, pdt, name="mixer")
    if self.letter == "M":
      return MambaMixer(a.d_model, a.d_state, a.expand, a.d_conv, a.dt_rank, a.dt_min, a.dt_max,
                        a.dt_init_floor, a.scan_impl, dt, pdt, name="mixer")
    if self.letter == "S":
      from ssm_lab.layers.mamba2 import Mamba2Mixer  # noqa: PLC0415 (optional until Mamba-2 lands)
      return Mamba2Mixer(d_model=a.d_model, d_state=a.ssd_d_state, head_dim=a.ssd_head_dim,
                         expand=a.expand, n_groups=a.ssd_n_groups, d_conv=a.d_conv,
                         chunk_size=a.ssd_chunk_size, dt_min=a.dt_min, dt_max=a.dt_max,
                         dt_init_floor=a.dt_init_floor, norm_eps=a.norm_eps, impl=a.ssd_impl,
                         dtype=dt, param_dtype=pdt, name="mixer")
    raise ValueError(f"no mixer for layer letter {self.letter!r}")

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None,
               positions: jax.Array | None) -> jax.Array:
    a = self.args
    norm = lambda name: RMSNorm(a.norm_eps, a.compute_dtype, a.params_dtype, name=name)
    mlp = lambda: SwiGLU(a.ff_dim, a.compute_dtype, a.params_dtype, name="mlp")
    if self.letter == "F":
      return x + mlp()(norm("mlp_norm")(x))
    h = norm("mixer_norm")(x)
    if self.letter == "A":
      h = self._mixer()(h, segment_ids=segment_ids, positions=positions)
    else:
      h = self._mixer()(h, segment_ids=segment_ids)
    x = x + h
    if a.block_mlp:
      x = x + mlp()(norm("mlp_norm")(x))
    return x


_REMAT_POLICIES = {
    "block": None,   # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LanguageModel(nn.Module):
  """tokens [batch, length] int -> logits.

  head "lm": [batch, length, vocab_size] next-token logits (float32).
  head "classifier": [batch, num_classes] logits from the pooled final hidden state; `pad_mask`
  [batch, length] (1 on real tokens) says which tokens pooling reads.
  """

  args: ModelArgs

  @nn.compact
  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, pad_mask: jax.Array | None = None) -> jax.Array:
    a = self.args
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
    embed = nn.Embed(a.vocab_size, a.d_model, embedding_init=nn.initializers.normal(0.02),
                     dtype=a.compute_dtype, param_dtype=a.params_dtype, name="embed")
    x = embed(tokens)
    block_cls = Block
    if a.remat != "none":
      block_cls = nn.remat(Block, policy=_REMAT_POLICIES[a.remat])
    for i, letter in enumerate(a.pattern):
      x = block_cls(a, letter, name=f"block_{i}")(x, segment_ids, positions)
    x = RMSNorm(a.norm_eps, a.compute_dtype, a.params_dtype, name="final_norm")(x)
    if a.head == "classifier":
      mask = (jnp.ones(tokens.shape, jnp.float32) if pad_mask is None
              else pad_mask.astype(jnp.float32))
      if a.pooling == "mean":
        pooled = (jnp.sum(x.astype(jnp.float32) * mask[..., None], axis=1)
                  / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0))
      else:
        last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
        pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
      return nn.Dense(a.num_classes, dtype=jnp.float32, param_dtype=a.params_dtype,
                      name="classifier")(pooled)
    if a.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(a.vocab_size, use_bias=False, dtype=a.compute_dtype,
                        param_dtype=a.params_dtype, name="lm_head")(x)
    return logits.astype(jnp.float32)
