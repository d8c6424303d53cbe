"""Models built from layer patterns: Transformers, Mamba, Mamba-2 and hybrids share one stack."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ssm_lab.models.flops import flops_per_token, param_count
from ssm_lab.models.hf_import import from_pretrained
from ssm_lab.models.lm import LanguageModel, ModelArgs


def build_model(model_cfg: Any, *, vocab_size: int | None = None,
                num_classes: int | None = None) -> LanguageModel:
  """`LanguageModel` from `config.model`; -1 / 0 fields take the given task values."""
  return LanguageModel(ModelArgs.from_config(model_cfg, vocab_size=vocab_size,
                                             num_classes=num_classes))


def abstract_params(model: LanguageModel, seq_len: int) -> Any:
  """Parameter shapes without allocating them."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]


__all__ = ["LanguageModel", "ModelArgs", "abstract_params", "build_model", "flops_per_token",
           "from_pretrained", "param_count"]
