"""Hugging Face checkpoint import: tiny random Llama / Mamba / Mamba-2 models built with
`transformers` (PyTorch, CPU) load through `from_pretrained` and give the same logits.

The reference models come from tests/hf_reference.py, run as a subprocess by a Python that has
torch + transformers: `$SSM_LAB_HF_PYTHON`, else `<repo>/.venv-hf/bin/python` (which .ci/run
creates). Without one the comparison tests skip, saying so; the error-path tests need no torch.

Tolerance: atol 1e-4 on logits of magnitude ~1-5 (float32 both sides; measured differences are
~1e-6, from summation order in the scans and matmuls).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import generate as gen
from ssm_lab.models import from_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ATOL = 1e-4


def reference_python() -> tuple[str | None, str]:
  """(interpreter, '') or (None, why there is none)."""
  candidates = [os.environ.get("SSM_LAB_HF_PYTHON", ""),
                os.path.join(REPO, ".venv-hf", "bin", "python")]
  for py in candidates:
    if py and os.path.exists(py):
      probe = subprocess.run([py, "-c", "import torch, transformers, safetensors"],
                             capture_output=True, text=True, check=False)
      if probe.returncode == 0:
        return py, ""
      return None, f"{py} cannot import torch/transformers/safetensors: {probe.stderr[-300:]}"
  return None, ("no Hugging Face reference interpreter: set SSM_LAB_HF_PYTHON to a Python with "
                "torch (CPU), transformers and safetensors, or create .venv-hf (see .ci/run)")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  py, why = reference_python()
  if py is None:
    pytest.skip(why)
  out = tmp_path_factory.mktemp("hf")
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  proc = subprocess.run([py, os.path.join(REPO, "tests", "hf_reference.py"), str(out)],
                        capture_output=True, text=True, env=env, check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def load_case(hf_models, name):
  path = hf_models / name
  return path, np.load(path / "tokens.npy"), np.load(path / "logits.npy")


def apply_fn(model):
  return jax.jit(model.apply, static_argnames=("mode", "last_logits_only"))


@pytest.mark.parametrize("name,pattern", [("llama", "AA"), ("llama_tied", "AA"),
                                          ("mamba", "MM"), ("mamba2", "SS")])
def test_imported_logits_match_transformers(hf_models, name, pattern):
  path, tokens, ref = load_case(hf_models, name)
  model, params = from_pretrained(str(path))
  assert model.args.pattern == pattern
  logits = apply_fn(model)({"params": params}, jnp.asarray(tokens))
  assert logits.shape == ref.shape == (2, 13, 64)
  np.testing.assert_allclose(logits, ref, atol=ATOL, rtol=0)


def test_imported_config_fields(hf_models):
  model, params = from_pretrained(str(hf_models / "llama_tied"))
  a, att = model.args, model.args.attention
  assert (att.num_heads, att.num_kv_heads, att.head_dim, a.d_ff, a.block_mlp) == (4, 1, 16, 40, True)
  assert a.tie_embeddings and "lm_head" not in params and a.norm_eps == 1e-6
  model, params = from_pretrained(str(hf_models / "llama"), attention=dict(impl="reference"))
  assert model.args.attention.rope_theta == 500.0 and not model.args.tie_embeddings
  assert model.args.attention.impl == "reference"   # an override merged into the imported group
  assert params["lm_head"]["kernel"].shape == (32, 64)
  with pytest.raises(ValueError, match=r"attention.num_heads.*cannot be overridden"):
    from_pretrained(str(hf_models / "llama"), attention=dict(num_heads=2))
  model, params = from_pretrained(str(hf_models / "mamba"), param_dtype="bfloat16")
  m = model.args.mamba
  assert (m.d_state, m.dt_rank, m.d_conv) == (8, 2, 4)
  assert params["block_0"]["mixer"]["conv1d"]["kernel"].shape == (4, 1, 64)
  assert params["block_0"]["mixer"]["A_log"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["llama", "mamba", "mamba2"])
def test_imported_model_decodes_to_the_reference_logits(hf_models, name):
  path, tokens, ref = load_case(hf_models, name)
  model, params = from_pretrained(str(path))
  apply = apply_fn(model)
  cache = gen.init_cache(model, 2, tokens.shape[1])
  logits, cache = apply({"params": params}, jnp.asarray(tokens[:, :5]), cache=cache,
                        mode="prefill")
  steps = [logits]
  for t in range(5, tokens.shape[1]):
    step, cache = apply({"params": params}, jnp.asarray(tokens[:, t:t + 1]), cache=cache,
                        mode="decode")
    steps.append(step)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), ref, atol=ATOL, rtol=0)


def test_sharded_checkpoint_with_an_index(hf_models, tmp_path):
  from safetensors.numpy import load_file, save_file
  src = hf_models / "llama"
  tensors = load_file(str(src / "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
  weight_map = {k: f for f, keys in shards.items() for k in keys}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  shutil.copy(src / "config.json", tmp_path / "config.json")
  _, tokens, ref = load_case(hf_models, "llama")
  model, params = from_pretrained(str(tmp_path))
  np.testing.assert_allclose(apply_fn(model)({"params": params}, jnp.asarray(tokens)), ref,
                             atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# Errors (no torch needed)


def write_llama_dir(path, **config_changes):
  from safetensors.numpy import save_file
  config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": 10, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True}
  config.update(config_changes)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  rng = np.random.default_rng(0)
  w = lambda *s: rng.normal(size=s).astype(np.float32)
  p = "model.layers.0."
  save_file({"model.embed_tokens.weight": w(10, 8), "model.norm.weight": w(8),
             p + "input_layernorm.weight": w(8), p + "post_attention_layernorm.weight": w(8),
             p + "self_attn.q_proj.weight": w(8, 8), p + "self_attn.k_proj.weight": w(8, 8),
             p + "self_attn.v_proj.weight": w(8, 8), p + "self_attn.o_proj.weight": w(8, 8),
             p + "mlp.gate_proj.weight": w(16, 8), p + "mlp.up_proj.weight": w(16, 8),
             p + "mlp.down_proj.weight": w(8, 16)}, str(path / "model.safetensors"))
  return path


def test_a_handmade_llama_directory_loads(tmp_path):
  model, params = from_pretrained(str(write_llama_dir(tmp_path / "m")))
  assert model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, 10)


def test_errors_name_the_file_or_field(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    from_pretrained(str(tmp_path / "nowhere"))
  gpt = tmp_path / "gpt"
  gpt.mkdir()
  (gpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                               "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="supported"):
    from_pretrained(str(gpt))
  with pytest.raises(ValueError, match="rope type 'llama3'"):
    from_pretrained(str(write_llama_dir(tmp_path / "rope",
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0})))
  with pytest.raises(ValueError, match="attention_bias"):
    from_pretrained(str(write_llama_dir(tmp_path / "bias", attention_bias=True)))
  with pytest.raises(ValueError, match="expects"):
    from_pretrained(str(write_llama_dir(tmp_path / "shape", intermediate_size=12)))
  bare = write_llama_dir(tmp_path / "bare")
  os.remove(bare / "model.safetensors")
  with pytest.raises(ValueError, match="no model.safetensors"):
    from_pretrained(str(bare))
  with pytest.raises(ValueError, match="cannot be overridden"):
    from_pretrained(str(write_llama_dir(tmp_path / "ov")), d_model=16)


def test_reference_script_is_python_311_compatible_source():
  # hf_reference.py runs under the reference interpreter, not this one: it must not import ssm_lab.
  src = open(os.path.join(REPO, "tests", "hf_reference.py")).read()
  assert "ssm_lab" not in src.split('"""', 2)[2]
  compile(src, "hf_reference.py", "exec")
  assert sys.version_info >= (3, 12)
