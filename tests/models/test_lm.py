"""LanguageModel from layer patterns: shapes, parameter counts, FLOPs, heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab.models import abstract_params, build_model, flops_per_token, param_count

KEY = jax.random.PRNGKey(0)


def model_cfg(**kw):
  cfg = config_lib.model_defaults()
  cfg.d_model = 32
  cfg.attention.num_heads = 2
  cfg.attention.num_kv_heads = 1
  for k, v in kw.items():
    if k in cfg.attention:
      cfg.attention[k] = v
    else:
      cfg[k] = v
  return cfg


@pytest.mark.parametrize("pattern,block_mlp", [("MMMM", False), ("AAAA", True),
                                               ("MMMAMMMM", True), ("MFAF", False)])
def test_patterns_build_and_give_logits(pattern, block_mlp):
  model = build_model(model_cfg(pattern=pattern, block_mlp=block_mlp), vocab_size=50)
  tokens = jax.random.randint(KEY, (2, 9), 0, 50)
  params = model.init(KEY, tokens)["params"]
  assert sorted(k for k in params if k.startswith("block_")) == [f"block_{i}"
                                                                 for i in range(len(pattern))]
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 9, 50) and logits.dtype == jnp.float32
  assert param_count(params) == param_count(abstract_params(model, 9))


def test_parameter_count_matches_hand_count_for_a_transformer():
  d, v, ff = 32, 50, 64
  model = build_model(model_cfg(pattern="A", block_mlp=True, d_ff=ff, num_kv_heads=2), vocab_size=v)
  params = model.init(KEY, jnp.zeros((1, 4), jnp.int32))["params"]
  attn = 4 * d * d          # q, k, v, o with 2 heads x 16 dims and 2 KV heads
  mlp = 3 * d * ff
  norms = 3 * d             # mixer_norm, mlp_norm, final_norm
  assert param_count(params) == v * d + attn + mlp + norms


def test_untied_embeddings_add_an_lm_head():
  tied = build_model(model_cfg(pattern="M"), vocab_size=50)
  untied = build_model(model_cfg(pattern="M", tie_embeddings=False), vocab_size=50)
  diff = param_count(abstract_params(untied, 4)) - param_count(abstract_params(tied, 4))
  assert diff == 32 * 50


def test_flops_per_token_grows_with_length_only_for_attention():
  mamba = build_model(model_cfg(pattern="MM"), vocab_size=50).args
  attn = build_model(model_cfg(pattern="AA", block_mlp=True), vocab_size=50).args
  assert flops_per_token(mamba, 1024) == flops_per_token(mamba, 64)
  assert flops_per_token(attn, 1024) > flops_per_token(attn, 64)
  # Training counts 3x the forward.
  assert flops_per_token(attn, 64) == 3 * flops_per_token(attn, 64, training=False)
  # The matmul part is at least 6 FLOPs per non-embedding parameter per token.
  params = abstract_params(build_model(model_cfg(pattern="AA", block_mlp=True), vocab_size=50), 8)
  non_embed = param_count(params) - param_count(params["embed"])
  assert flops_per_token(attn, 1) >= 6 * (non_embed - 5 * 32)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_head_pools_real_tokens(pooling):
  model = build_model(model_cfg(pattern="AM", head="classifier", num_classes=3, pooling=pooling),
                      vocab_size=50)
  tokens = jax.random.randint(KEY, (2, 8), 1, 50)
  mask = jnp.array([[1] * 5 + [0] * 3, [1] * 8], jnp.float32)
  params = model.init(KEY, tokens, pad_mask=mask)["params"]
  out = model.apply({"params": params}, tokens, pad_mask=mask)
  assert out.shape == (2, 3)
  # Padding content must not matter.
  out2 = model.apply({"params": params}, tokens.at[0, 6].set(7), pad_mask=mask)
  np.testing.assert_allclose(out[0], out2[0], rtol=1e-5, atol=1e-5)


def test_remat_gives_the_same_gradients():
  tokens = jax.random.randint(KEY, (2, 8), 0, 50)
  plain = build_model(model_cfg(pattern="MA", block_mlp=True), vocab_size=50)
  remat = build_model(model_cfg(pattern="MA", block_mlp=True, remat="block"), vocab_size=50)
  params = plain.init(KEY, tokens)["params"]
  grad = lambda m: jax.grad(lambda p: m.apply({"params": p}, tokens).sum())(params)
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_token_rank_is_rejected():
  model = build_model(model_cfg(pattern="M"), vocab_size=50)
  with pytest.raises(ValueError, match="tokens must be"):
    model.init(KEY, jnp.zeros((4,), jnp.int32))
