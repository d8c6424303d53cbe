"""Reference checkpoints for tests/models/test_hf_import.py, made with Hugging Face `transformers`.

Run with an interpreter that has torch (CPU), transformers and safetensors — not the project's venv:

  python tests/hf_reference.py OUT_DIR

For each case it builds a tiny randomly initialised model (every parameter also gets random noise,
so a mis-mapped norm, bias or A_log shows in the logits), saves it with `save_pretrained` (config.json
+ model.safetensors) under OUT_DIR/<case>/, and writes the fixed input tokens.npy [batch, length]
int32 and the model's float32 logits.npy [batch, length, vocab]. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 64


def cases() -> dict:
  """case name -> (model class, config)."""
  llama = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
      max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
  # head_dim * heads != hidden_size, multi-query attention and tied embeddings.
  llama_tied = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
      tie_word_embeddings=True, max_position_embeddings=64)
  mamba = transformers.MambaConfig(
      vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
      conv_kernel=4, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
  mamba2 = transformers.Mamba2Config(
      vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
      head_dim=16, num_heads=4, n_groups=2, conv_kernel=4, chunk_size=8,
      layer_norm_epsilon=1e-5, tie_word_embeddings=False)
  return {"llama": (transformers.LlamaForCausalLM, llama),
          "llama_tied": (transformers.LlamaForCausalLM, llama_tied),
          "mamba": (transformers.MambaForCausalLM, mamba),
          "mamba2": (transformers.Mamba2ForCausalLM, mamba2)}


def main(out_dir: str) -> None:
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  summary = {"torch": torch.__version__, "transformers": transformers.__version__, "cases": []}
  for name, (cls, config) in cases().items():
    model = cls(config).float().eval()
    with torch.no_grad():
      for pname, p in model.named_parameters():
        noise = 0.05 if "A_log" not in pname else 0.2
        p.add_(noise * torch.randn_like(p))
    tokens = rng.integers(0, VOCAB, size=(2, 13)).astype(np.int32)
    with torch.no_grad():
      logits = model(torch.from_numpy(tokens).long(), use_cache=False).logits.float().numpy()
    path = os.path.join(out_dir, name)
    model.save_pretrained(path, safe_serialization=True)
    np.save(os.path.join(path, "tokens.npy"), tokens)
    np.save(os.path.join(path, "logits.npy"), logits.astype(np.float32))
    summary["cases"].append(name)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python tests/hf_reference.py OUT_DIR")
  main(sys.argv[1])
