"""Every registered mixer, built from its registry entry alone: a one-block LanguageModel of its
letter with the group's default config runs forward, prefills, counts FLOPs, and (when stateful)
counts its cache in closed form exactly as init_cache allocates it. The cases come from
`registry.specs()`, so a new mixer is covered the moment it registers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import config as config_lib
from ssm_lab.layers import registry
from ssm_lab.models import cache_memory, flops
from ssm_lab.models.lm import LanguageModel, ModelArgs

LETTERS = [s.letter for s in registry.specs()]


def random_params(model, tokens):
  """Parameters of the model's shapes drawn in NumPy (compiling model.init costs seconds on CPU)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype),
                                shapes)


@pytest.mark.parametrize("letter", LETTERS)
def test_every_mixer_builds_from_the_registry_alone(letter):
  spec = registry.get(letter)
  args = ModelArgs(pattern=letter, d_model=32, vocab_size=17)
  model = LanguageModel(args)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 17)
  params = random_params(model, tokens)
  logits = jax.jit(model.apply)({"params": params}, tokens)
  assert logits.shape == (2, 6, 17) and bool(jnp.all(jnp.isfinite(logits)))
  assert flops.mixer_flops_per_token(args, letter, 6) > 0
  assert flops.flops_per_token(args, 6) > flops.flops_per_token(args, 6, training=False) > 0
  # The default group config validates through config.validate.
  config = config_lib.base_config()
  config.task.name = "mqar"
  config.model.pattern, config.model.d_model = letter, 32
  config_lib.validate(config)
  if spec.stateless:
    return
  for context in (6, 50):
    per_seq = cache_memory.cache_bytes_per_sequence(args, context)
    assert per_seq["total"] * 2 + 4 == cache_memory.allocated_cache_bytes(args, 2, context)
  cache = model.init_cache(2, 6)
  prefill_logits, cache = jax.jit(model.apply, static_argnames="mode")(
      {"params": params}, tokens, cache=cache, mode="prefill")
  np.testing.assert_allclose(prefill_logits, logits, atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == 6


def test_registry_docstring_lists_every_mixer():
  rows = set(re.findall(r"^  ([A-Z])  ", registry.__doc__, flags=re.M))
  assert rows == set(LETTERS), "add the mixer's row to ssm_lab/layers/registry.py's docstring"
  spec_rows = registry.describe().splitlines()
  assert len(spec_rows) == len(LETTERS)


def test_registry_rejects_a_taken_letter_or_group():
  taken = registry.get("L")
  with pytest.raises(ValueError, match="letter 'L' is taken"):
    registry.register(registry.MixerSpec(letter="L", name="other", description="x", paper="x",
                                         config=None, module=lambda *a, **k: None,
                                         flops_per_token=lambda *a: 1.0))
  with pytest.raises(ValueError, match="group 'lstm' is taken"):
    registry.register(registry.MixerSpec(letter="Z", name="lstm", description="x", paper="x",
                                         config=None, module=lambda *a, **k: None,
                                         flops_per_token=lambda *a: 1.0))
  assert registry.get("L") is taken and "Z" not in registry.letters()
