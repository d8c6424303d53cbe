"""Mixers as plug-ins: the one registry every model-level module reads.

A mixer is what one letter of `config.model.pattern` puts in a pre-norm residual block. Each mixer
registers a `MixerSpec` from its own layer file; `LanguageModel`, config validation, FLOP counts,
cache memory, generation and the Hugging Face import read the spec and never name a mixer. Adding a
mixer is its layer file (module + spec + `register(...)`) plus one line in `BUILTIN` below.

Registered mixers (letter, config group, paper):

  A  attention  causal self-attention, RoPE, grouped KV heads   Vaswani et al. 2017; Su et al. 2021
  M  mamba      Mamba-1 selective SSM (S6) block                Gu & Dao 2023, arXiv 2312.00752
  S  mamba2     Mamba-2 (SSD) block                             Dao & Gu 2024, arXiv 2405.21060
  F  (none)     SwiGLU MLP only                                 Shazeer 2020, arXiv 2002.05202
  D  s4d        S4D-Real LTI diagonal SSM in Mamba's block      Gu, Goel, Gupta & Ré 2022, arXiv 2206.11893
  L  lstm       single-layer LSTM (lax.scan)                    Hochreiter & Schmidhuber 1997
  H  hyena      Hyena order-2 gated long conv, implicit filter  Poli et al. 2023, arXiv 2302.10866
  G  gru        single-layer GRU (lax.scan)                     Cho et al. 2014, arXiv 1406.1078

`python -c "from ssm_lab.layers import registry; print(registry.describe())"` prints the live list.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

# The modules that register the built-in mixers, imported on first use of the registry.
BUILTIN = (
    "ssm_lab.layers.attention",
    "ssm_lab.layers.mamba",
    "ssm_lab.layers.mamba2",
    "ssm_lab.layers.mlp",
    "ssm_lab.layers.s4d",
    "ssm_lab.layers.lstm",
    "ssm_lab.layers.hyena",
    "ssm_lab.layers.gru",
)


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """Everything the model stack needs to know about one mixer.

  Attributes:
    letter: its pattern letter (one upper-case character).
    name: its config group, `config.model.<name>`; with `config`=None the mixer has no fields.
    description: one line for errors and listings.
    paper: the citation the mixer follows.
    config: a frozen dataclass whose fields (with defaults) are the group's fields; None for none.
    module: `module(args, cfg, name=...) -> nn.Module`, built with keyword arguments; `args` is the
      model's `ModelArgs` (d_model, compute_dtype, params_dtype, norm_eps, ...), `cfg` the group.
      A stateful mixer's module is called `m(x, segment_ids=..., positions=..., [cache=, mode=])`
      with x [batch, length, d_model] and returns y (mode "full") or (y, cache) ("prefill",
      "decode"); a stateless one (init_cache None) is called `m(x)`.
    flops_per_token: `f(args, cfg, seq_len) -> float`, forward FLOPs per token (2 per multiply-add).
    init_cache: `f(args, cfg, batch, max_len) -> pytree` of an empty decoding cache; None: stateless.
    cache_bytes: `f(args, cfg, context_len) -> {"kv"|"conv"|"ssm"|"state": bytes}` for one sequence,
      equal to what init_cache allocates per sequence.
    validate: `f(args, cfg, prefix)` raising `ssm_lab.errors.ConfigError` naming `prefix.<field>`.
    no_weight_decay: parameter names the optimizer keeps out of weight decay (besides 1-D ones),
      matched within this mixer's own submodule of each block that uses it.
    renamed: {old flat `config.model` field: field of this group}; the old name is rejected with
      an error naming the new one.
    hf_architectures: {Hugging Face architecture: converter(config, tensors) -> (ModelArgs kwargs,
      params)}, read by `ssm_lab.models.from_pretrained`.
    module_name, norm_name: the block's submodule names (parameter paths) of the mixer and its norm.
    block_mlp: whether `config.model.block_mlp` adds a SwiGLU sublayer after this mixer.
  """

  letter: str
  name: str
  description: str
  paper: str
  config: type | None
  module: Callable[..., Any]
  flops_per_token: Callable[..., float]
  init_cache: Callable[..., Any] | None = None
  cache_bytes: Callable[..., dict[str, int]] | None = None
  validate: Callable[..., None] | None = None
  no_weight_decay: tuple[str, ...] = ()
  renamed: dict[str, str] = dataclasses.field(default_factory=dict)
  hf_architectures: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
  module_name: str = "mixer"
  norm_name: str = "mixer_norm"
  block_mlp: bool = True

  @property
  def stateless(self) -> bool:
    return self.init_cache is None


_BY_LETTER: dict[str, MixerSpec] = {}
_loaded = False


def register(spec: MixerSpec) -> MixerSpec:
  """Adds `spec`; a second mixer with the same letter or group name is an error."""
  if len(spec.letter) != 1 or not spec.letter.isupper():
    raise ValueError(f"mixer {spec.name!r}: letter must be one upper-case character, got "
                     f"{spec.letter!r}")
  old = _BY_LETTER.get(spec.letter)
  if old is not None and old is not spec and old.module is not spec.module:
    raise ValueError(f"mixer letter {spec.letter!r} is taken by {old.name!r} ({old.description})")
  for other in _BY_LETTER.values():
    if other.letter != spec.letter and spec.name and other.name == spec.name:
      raise ValueError(f"mixer config group {spec.name!r} is taken by letter {other.letter!r}")
  if spec.config is not None and not dataclasses.is_dataclass(spec.config):
    raise ValueError(f"mixer {spec.letter!r}: config must be a dataclass type")
  _BY_LETTER[spec.letter] = spec
  return spec


def _load() -> None:
  global _loaded
  if not _loaded:
    _loaded = True
    for module in BUILTIN:
      importlib.import_module(module)


def specs() -> tuple[MixerSpec, ...]:
  """Every registered mixer, in registration order."""
  _load()
  return tuple(_BY_LETTER.values())


def letters() -> dict[str, str]:
  """{letter: description} of every registered mixer."""
  return {s.letter: s.description for s in specs()}


def get(letter: str) -> MixerSpec:
  """The mixer of a pattern letter; ValueError listing the letters for an unknown one."""
  _load()
  if letter not in _BY_LETTER:
    raise ValueError(f"unknown layer letter {letter!r}; letters: "
                     + ", ".join(f"{k} = {s.description}" for k, s in _BY_LETTER.items()))
  return _BY_LETTER[letter]


def groups() -> dict[str, MixerSpec]:
  """{config group name: spec} of the mixers that have config fields."""
  return {s.name: s for s in specs() if s.config is not None}


def renamed_fields() -> dict[str, list[str]]:
  """{old flat config.model field: ["<group>.<field>", ...]} over every mixer."""
  out: dict[str, list[str]] = {}
  for s in specs():
    for old, new in s.renamed.items():
      out.setdefault(old, []).append(f"{s.name}.{new}")
  return out


def hf_converters() -> dict[str, Callable[..., Any]]:
  """{Hugging Face architecture: converter} over every mixer."""
  return {arch: fn for s in specs() for arch, fn in s.hf_architectures.items()}


def describe() -> str:
  """One line per mixer: letter, config group, description, paper."""
  return "\n".join(f"{s.letter}  {s.name or '-':<10} {s.description}  [{s.paper}]" for s in specs())
