"""`LanguageModel`: one stack for Transformers, Mamba, Mamba-2 and hybrids, built from a layer pattern.

Each letter of `pattern` is one pre-norm residual block whose mixer comes from the registry
(`ssm_lab.layers.registry`), for example:
  A  causal self-attention     M  Mamba-1 mixer     S  Mamba-2 mixer     F  SwiGLU MLP only
  D  S4D (LTI) SSM             H  Hyena long conv   L  LSTM              G  GRU
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

from ssm_lab.layers import registry
from ssm_lab.layers.mlp import SwiGLU, default_d_ff
from ssm_lab.layers.norm import RMSNorm

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


_COMMON_DEFAULTS = dict(block_mlp=False, d_ff=0, tie_embeddings=True, norm_eps=1e-5,
                       dtype="float32", param_dtype="float32", head="lm", num_classes=0,
                       pooling="last", remat="none")


@dataclasses.dataclass(frozen=True, init=False)
class ModelArgs:
  """The fields of `config.model` (see ssm_lab.config.model_defaults), resolved and hashable.

  Model-level fields are attributes; each mixer's group is a frozen dataclass reached by its name
  (`args.attention.num_heads`, `args.mamba.d_state`). Build with keywords, a group as a dict or its
  dataclass: `ModelArgs(pattern="MA", d_model=64, vocab_size=128, attention=dict(num_heads=2))`;
  groups not given take their defaults.
  """

  pattern: str
  d_model: int
  vocab_size: int
  block_mlp: bool
  d_ff: int
  tie_embeddings: bool
  norm_eps: float
  dtype: str
  param_dtype: str
  head: str
  num_classes: int
  pooling: str
  remat: str
  mixers: tuple[tuple[str, Any], ...]   # ((group name, group dataclass), ...), registry order

  def __init__(self, *, pattern: str, d_model: int, vocab_size: int, mixers: Any = None,
               **kw: Any):
    groups = registry.groups()
    given = dict(mixers or ())
    for name in list(kw):
      if name in groups:
        given[name] = kw.pop(name)
    moved = registry.renamed_fields()
    for name in kw:
      if name in moved:
        raise TypeError(f"ModelArgs: {name!r} moved to the mixer groups: {', '.join(moved[name])} "
                        f"(for example {moved[name][0].split('.')[0]}=dict("
                        f"{moved[name][0].split('.')[1]}=...))")
      if name not in _COMMON_DEFAULTS:
        raise TypeError(f"ModelArgs: unknown field {name!r}; model fields: "
                        f"{sorted(_COMMON_DEFAULTS)}, mixer groups: {sorted(groups)}")
    for name in given:
      if name not in groups:
        raise TypeError(f"ModelArgs: unknown mixer group {name!r}; groups: {sorted(groups)}")
    resolved = []
    for name, spec in groups.items():
      value = given.get(name)
      if value is None:
        value = spec.config()
      elif not isinstance(value, spec.config):
        value = dict(value)
        fields = {f.name for f in dataclasses.fields(spec.config)}
        unknown = sorted(set(value) - fields)
        if unknown:
          raise TypeError(f"ModelArgs: {name}.{unknown[0]} is not a field of mixer group "
                          f"{name!r}; its fields: {sorted(fields)}")
        value = spec.config(**value)
      resolved.append((name, value))
    setattr_ = lambda k, v: object.__setattr__(self, k, v)
    setattr_("pattern", pattern)
    setattr_("d_model", d_model)
    setattr_("vocab_size", vocab_size)
    for name, default in _COMMON_DEFAULTS.items():
      setattr_(name, kw.get(name, default))
    setattr_("mixers", tuple(resolved))

  def __getattr__(self, name: str) -> Any:
    # Only called for names that are not attributes: the mixer groups.
    if name.startswith("__") or name == "mixers":
      raise AttributeError(name)
    for group, value in self.__dict__.get("mixers", ()):
      if group == name:
        return value
    raise AttributeError(f"ModelArgs has no field or mixer group {name!r}")

  def group(self, name: str) -> Any:
    """The config dataclass of mixer group `name` (None for a mixer without fields)."""
    return getattr(self, name) if name else None

  @classmethod
  def from_config(cls, model_cfg: Any, *, vocab_size: int | None = None,
                  num_classes: int | None = None) -> "ModelArgs":
    """From `config.model`; a vocab_size of -1 (num_classes 0) takes the task's value given here."""
    kw = {k: (dict(v) if hasattr(v, "keys") else v) for k, v in dict(model_cfg).items()}
    if kw.get("vocab_size", -1) in (-1, None):
      if vocab_size is None:
        raise ValueError("config.model.vocab_size is -1 (take the task's) but no task vocab given")
      kw["vocab_size"] = vocab_size
    if not kw.get("num_classes") and num_classes:
      kw["num_classes"] = num_classes
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    """Keyword arguments that rebuild these args (groups as dicts)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mixers"}
    out.update({name: dataclasses.asdict(value) for name, value in self.mixers})
    return out

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def ff_dim(self) -> int:
    return self.d_ff or default_d_ff(self.d_model)


class Block(nn.Module):
  """One pre-norm residual block: x + mixer(norm(x)) [+ mlp(norm(.))]. x: [batch, length, d_model].

  The mixer comes from the registry entry of `letter`; the block never names a mixer."""

  args: ModelArgs
  letter: str

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None,
               cache: Any = None, mode: str = "full") -> Any:
    """x in "full" mode; (x, cache) in the cache modes (see LanguageModel)."""
    a = self.args
    spec = registry.get(self.letter)
    norm = lambda name: RMSNorm(a.norm_eps, a.compute_dtype, a.params_dtype, name=name)
    mixer = spec.module(a, a.group(spec.name), name=spec.module_name)
    h = norm(spec.norm_name)(x)
    if spec.stateless:
      h = mixer(h)
    elif mode == "full":
      h = mixer(h, segment_ids=segment_ids, positions=positions)
    else:
      h, cache = mixer(h, segment_ids=segment_ids, positions=positions, cache=cache, mode=mode)
    x = x + h
    if a.block_mlp and spec.block_mlp:
      x = x + SwiGLU(a.ff_dim, a.compute_dtype, a.params_dtype, name="mlp")(norm("mlp_norm")(x))
    return x if mode == "full" else (x, cache)


_REMAT_POLICIES = {
    "block": None,   # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def init_cache(args: ModelArgs, batch: int, max_len: int) -> dict[str, Any]:
  """An empty decoding cache for `batch` sequences of up to `max_len` tokens (prompt + generated).

  Each block's entry comes from its mixer's registry entry (`init_cache`): attention a KV cache of
  min(max_len, sliding_window or max_len) slots, the SSMs a state independent of max_len, stateless
  blocks nothing.
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got batch={batch}, "
                     f"max_len={max_len}")
  blocks: dict[str, Any] = {}
  for i, letter in enumerate(args.pattern):
    spec = registry.get(letter)
    blocks[f"block_{i}"] = ({} if spec.stateless
                            else spec.init_cache(args, args.group(spec.name), batch, max_len))
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
