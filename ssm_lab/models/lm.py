"""`LanguageModel`: one stack for Transformers, Mamba, Mamba-2 and hybrids, built from a layer pattern.

Each letter of `pattern` is one pre-norm residual block (`ssm_lab.config.LAYER_LETTERS`):
  A  causal self-attention     M  Mamba-1 mixer     S  Mamba-2 mixer     F  SwiGLU MLP only
With `block_mlp`, every mixer block also gets a SwiGLU sublayer (Transformer / Jamba style). So
"AAAA" + block_mlp is a LLaMA-style Transformer, "MMMM" a Mamba, "MMMAMMMM" + block_mlp a Jamba-like
hybrid, and "SFSFSA" a Nemotron-H-like stack.

Decoding threads a cache through the same modules (`init_cache`, then `mode="prefill"` and
`mode="decode"`; `ssm_lab.generate` wraps them): {"index": int32 [] (tokens seen so far),
"blocks": {"block_<i>": the layer's cache}}. Attention blocks hold a KV cache (a ring buffer of
window size with a sliding window), Mamba blocks a constant (conv, ssm) state, F blocks nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssm_lab.layers.attention import (CausalSelfAttention, attention_cache_len,
                                      init_attention_cache)
from ssm_lab.layers.mamba import MambaMixer, init_mamba_cache
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
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None,
               cache: Any = None, mode: str = "full") -> Any:
    """x in "full" mode; (x, cache) in the cache modes (see LanguageModel)."""
    a = self.args
    norm = lambda name: RMSNorm(a.norm_eps, a.compute_dtype, a.params_dtype, name=name)
    mlp = lambda: SwiGLU(a.ff_dim, a.compute_dtype, a.params_dtype, name="mlp")
    if self.letter == "F":
      x = x + mlp()(norm("mlp_norm")(x))
      return x if mode == "full" else (x, cache)
    h = norm("mixer_norm")(x)
    kw = {} if mode == "full" else {"cache": cache, "mode": mode}
    if self.letter == "A":
      h = self._mixer()(h, segment_ids=segment_ids, positions=positions, **kw)
    else:
      h = self._mixer()(h, segment_ids=segment_ids, **kw)
    if mode != "full":
      h, cache = h
    x = x + h
    if a.block_mlp:
      x = x + mlp()(norm("mlp_norm")(x))
    return x if mode == "full" else (x, cache)


_REMAT_POLICIES = {
    "block": None,   # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def init_cache(args: ModelArgs, batch: int, max_len: int) -> dict[str, Any]:
  """An empty decoding cache for `batch` sequences of up to `max_len` tokens (prompt + generated).

  Attention layers get [batch, min(max_len, sliding_window or max_len), kv_heads, head_dim] K and V
  in the compute dtype; Mamba layers a [batch, d_conv - 1, d_inner] conv state and a float32
  [batch, d_inner, d_state] SSM state, independent of max_len.
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got batch={batch}, "
                     f"max_len={max_len}")
  a, dt = args, args.compute_dtype
  blocks: dict[str, Any] = {}
  for i, letter in enumerate(a.pattern):
    if letter == "A":
      blocks[f"block_{i}"] = init_attention_cache(
          batch, attention_cache_len(max_len, a.sliding_window), a.num_kv_heads, a.attn_head_dim,
          dt)
    elif letter == "M":
      blocks[f"block_{i}"] = init_mamba_cache(batch, a.expand * a.d_model, a.d_state, a.d_conv, dt)
    elif letter == "S":
      from ssm_lab.layers import mamba2  # noqa: PLC0415 (optional until Mamba-2 lands)
      init_mamba2_cache = getattr(mamba2, "init_mamba2_cache", None)
      if init_mamba2_cache is None:
        raise ValueError(f"pattern {a.pattern!r}: the Mamba-2 layer (S) has no decoding cache yet")
      blocks[f"block_{i}"] = init_mamba2_cache(
          batch, d_inner=a.expand * a.d_model, d_state=a.ssd_d_state, head_dim=a.ssd_head_dim,
          n_groups=a.ssd_n_groups, d_conv=a.d_conv, dtype=dt)
    else:
      blocks[f"block_{i}"] = {}
  return {"index": jnp.zeros((), jnp.int32), "blocks": blocks}


class LanguageModel(nn.Module):
  """tokens [batch, length] int -> logits.

  head "lm": [batch, length, vocab_size] next-token logits (float32).
  head "classifier": [batch, num_classes] logits from the pooled final hidden state; `pad_mask`
  [batch, length] (1 on real tokens) says which tokens pooling reads.

  Decoding (head "lm"): `mode="prefill"` runs the prompt from position 0 through the same code as
  "full" and returns (logits, cache) with the cache filled (`cache` is an empty one from
  `init_cache`, used for its shapes); `mode="decode"` appends `tokens` at positions cache["index"]...
  and returns (logits, cache). `last_logits_only` returns [batch, 1, vocab_size] logits of the last
  token alone (prefilling a long prompt never materialises [batch, length, vocab_size]).
  """

  args: ModelArgs

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    return init_cache(self.args, batch, max_len)

  @nn.compact
  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, pad_mask: jax.Array | None = None,
               cache: dict[str, Any] | None = None, mode: str = "full",
               last_logits_only: bool = False) -> Any:
    a = self.args
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
    if mode not in ("full", "prefill", "decode"):
      raise ValueError(f"mode must be 'full', 'prefill' or 'decode', got {mode!r}")
    if mode != "full":
      if cache is None or a.head != "lm":
        raise ValueError(f"mode={mode!r} needs head 'lm' (got {a.head!r}) and a cache from "
                         f"init_cache (got {type(cache).__name__})")
      if segment_ids is not None or positions is not None:
        raise ValueError(f"mode={mode!r} takes no segment_ids or positions: the cache's index "
                         f"gives the positions")
      start = jnp.zeros((), jnp.int32) if mode == "prefill" else cache["index"]
      positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                   tokens.shape)
    embed = nn.Embed(a.vocab_size, a.d_model, embedding_init=nn.initializers.normal(0.02),
                     dtype=a.compute_dtype, param_dtype=a.params_dtype, name="embed")
    x = embed(tokens)
    block_cls = Block
    if a.remat != "none" and mode == "full":
      block_cls = nn.remat(Block, policy=_REMAT_POLICIES[a.remat])
    new_blocks = {}
    for i, letter in enumerate(a.pattern):
      block = block_cls(a, letter, name=f"block_{i}")
      if mode == "full":
        x = block(x, segment_ids, positions)
      else:
        x, new_blocks[f"block_{i}"] = block(x, None, positions, cache["blocks"][f"block_{i}"],
                                            mode)
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
    if last_logits_only:
      x = x[:, -1:]
    if a.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(a.vocab_size, use_bias=False, dtype=a.compute_dtype,
                        param_dtype=a.params_dtype, name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    if mode == "full":
      return logits
    return logits, {"index": positions[0, -1] + 1, "blocks": new_blocks}
