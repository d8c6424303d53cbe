"""Import Hugging Face checkpoints from a local directory into ssm_lab models (never downloads).

  model, params = from_pretrained("/path/to/mamba-130m-hf")
  logits = model.apply({"params": params}, tokens)         # [batch, length, vocab] float32

The directory is what `save_pretrained` writes (or a model repository cloned from the Hub):
`config.json` plus `model.safetensors` or sharded `model-0000x-of-0000y.safetensors` with
`model.safetensors.index.json`. Supported architectures (config "architectures" / "model_type"):

  MambaForCausalLM  (mamba)   state-spaces/mamba-*-hf layout  -> pattern "M" * n_layers
  Mamba2ForCausalLM (mamba2)  state-spaces/mamba2-* HF layout -> pattern "S" * n_layers
  LlamaForCausalLM  (llama)   LLaMA / Llama-2 / TinyLlama ... -> pattern "A" * n_layers, SwiGLU

Layout notes (HF PyTorch -> ssm_lab flax): nn.Linear weights are [out, in], flax kernels [in, out];
a depthwise Conv1d weight [channels, 1, k] becomes the flax kernel [k, 1, channels] (both are
cross-correlations, so no flip); Mamba's dt_proj [d_inner, rank] becomes dt_proj_kernel [rank,
d_inner] and its bias dt_bias; Llama's q/k/v/o projections are reshaped by head. Llama applies RoPE in
the rotate-half layout, as ssm_lab does, so q and k need no permutation. A tied head (no lm_head
weight, or tie_word_embeddings) reuses the embedding. Settings ssm_lab does not model (projection
biases, rope scaling, other activations) raise ValueError rather than load into a different network.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab.layers import registry
from ssm_lab.models.lm import LanguageModel, ModelArgs

Params = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Reading the directory


class Tensors:
  """Lazy name -> np.ndarray over a checkpoint's safetensors file(s); records what was read."""

  def __init__(self, path: str):
    from safetensors import safe_open  # noqa: PLC0415 (only the import path needs it)

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files = ["model.safetensors"]
    else:
      found = sorted(os.listdir(path))
      raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json (found "
                       f"{found}); PyTorch .bin checkpoints are not read: re-save with "
                       f"save_pretrained(safe_serialization=True)")
    self._handles = [safe_open(os.path.join(path, f), framework="numpy") for f in files]
    self._where = {name: h for h in self._handles for name in h.keys()}
    self.path = path
    self.used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def names(self) -> list[str]:
    return sorted(self._where)

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise ValueError(f"{self.path}: tensor {name!r} missing from the checkpoint (it has "
                       f"{len(self._where)} tensors, e.g. {self.names()[:4]})")
    self.used.add(name)
    return self._where[name].get_tensor(name)


def read_config(path: str) -> dict[str, Any]:
  config_path = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.exists(config_path):
    raise ValueError(f"{path!r} is not a Hugging Face model directory: no config.json in it "
                     f"(from_pretrained reads local files only; download the model first)")
  with open(config_path) as f:
    try:
      return json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: say which file
      raise ValueError(f"{config_path}: not valid JSON ({err})") from None


def _float(v: Any) -> float:
  """transformers 5 writes infinities as {"__float__": "Infinity"}; older versions as Infinity."""
  if isinstance(v, dict) and "__float__" in v:
    return float(v["__float__"])
  return float(v)


def _architecture(config: dict[str, Any]) -> str:
  """The architecture to convert: the first of config["architectures"] a mixer's registry entry
  converts, else the one whose name matches config["model_type"] (MambaForCausalLM: "mamba")."""
  archs = config.get("architectures") or []
  by_type = {a.removesuffix("ForCausalLM").lower(): a for a in registry.hf_converters()}
  for a in archs:
    if a in by_type.values():
      return a
  if config.get("model_type") in by_type:
    return by_type[config["model_type"]]
  raise ValueError(f"config.json: architectures={archs}, model_type={config.get('model_type')!r}; "
                   f"supported: {sorted(by_type.values())}")


def _require(config: dict[str, Any], field: str, ok: Callable[[Any], bool], why: str,
             default: Any = None) -> None:
  value = config.get(field, default)
  if not ok(value):
    raise ValueError(f"config.json: {field}={value!r} is not supported ({why})")


# ------------------------------------------------------------------------------------------------
# Per-architecture ModelArgs and parameter trees


def _linear(t: Tensors, name: str) -> np.ndarray:
  """An nn.Linear weight [out, in] as a flax kernel [in, out]."""
  return t.get(name).T


def _depthwise_conv(t: Tensors, name: str) -> np.ndarray:
  """A depthwise Conv1d weight [channels, 1, k] as a flax kernel [k, 1, channels]."""
  w = t.get(name)
  return np.transpose(w, (2, 1, 0))


def _head(t: Tensors, config: dict[str, Any], embed_name: str) -> tuple[bool, Params]:
  tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in t
  if tied:
    if "lm_head.weight" in t:
      # save_pretrained may still store the tied copy; it must equal the embedding.
      if not np.array_equal(t.get("lm_head.weight"), t.get(embed_name)):
        raise ValueError(f"{t.path}: tie_word_embeddings is set but lm_head.weight differs from "
                         f"{embed_name}")
    return True, {}
  return False, {"lm_head": {"kernel": _linear(t, "lm_head.weight")}}


def _ssm_backbone(t: "Tensors") -> Params:
  """Embedding and final norm of HF's Mamba / Mamba-2 `backbone`."""
  return {"embed": {"embedding": t.get("backbone.embeddings.weight")},
          "final_norm": {"scale": t.get("backbone.norm_f.weight")}}


def _ssm_block(t: "Tensors", i: int, conv_dim: int, specific) -> Params:
  """Block i of a Mamba / Mamba-2 backbone: the parameters both mixers share, plus
  `specific(mixer_prefix)` (Mamba's x_proj / dt_proj, Mamba-2's dt_bias / gated norm)."""
  p = f"backbone.layers.{i}."
  m = p + "mixer."
  conv_bias = (t.get(m + "conv1d.bias") if m + "conv1d.bias" in t
               else np.zeros((conv_dim,), np.float32))
  mixer = {
      "in_proj": {"kernel": _linear(t, m + "in_proj.weight")},
      "conv1d": {"kernel": _depthwise_conv(t, m + "conv1d.weight"), "bias": conv_bias},
      "A_log": t.get(m + "A_log"),
      "D": t.get(m + "D"),
      "out_proj": {"kernel": _linear(t, m + "out_proj.weight")},
      **specific(m),
  }
  return {"mixer_norm": {"scale": t.get(p + "norm.weight")}, "mixer": mixer}


def convert_mamba(config: dict[str, Any], t: Tensors, *, letter: str,
                  group: str) -> tuple[dict[str, Any], Params]:
  """MambaForCausalLM -> (ModelArgs kwargs with `letter` blocks and their `group`, params)."""
  _require(config, "use_bias", lambda v: not v, "ssm_lab's Mamba in/out projections have no bias",
           False)
  _require(config, "hidden_act", lambda v: v == "silu", "Mamba uses silu", "silu")
  n_layers, d = int(config["num_hidden_layers"]), int(config["hidden_size"])
  expand = config.get("expand", 2)
  d_inner = int(expand * d)
  if d_inner != expand * d or int(expand) != expand:
    raise ValueError(f"config.json: expand={expand} must be an integer")
  rank = config.get("time_step_rank", "auto")
  rank = math.ceil(d / 16) if rank == "auto" else int(rank)
  kw = {"pattern": letter * n_layers, "d_model": d,
        group: dict(d_state=int(config.get("state_size", 16)), expand=int(expand),
                    d_conv=int(config.get("conv_kernel", 4)), dt_rank=rank),
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)), "block_mlp": False}
  params = _ssm_backbone(t)
  for i in range(n_layers):
    params[f"block_{i}"] = _ssm_block(t, i, d_inner, lambda m: {
        "x_proj": {"kernel": _linear(t, m + "x_proj.weight")},
        "dt_proj_kernel": _linear(t, m + "dt_proj.weight"),
        "dt_bias": t.get(m + "dt_proj.bias"),
    })
  kw["tie_embeddings"], head = _head(t, config, "backbone.embeddings.weight")
  params.update(head)
  return kw, params


def convert_mamba2(config: dict[str, Any], t: Tensors, *, letter: str,
                   group: str) -> tuple[dict[str, Any], Params]:
  """Mamba2ForCausalLM -> (ModelArgs kwargs with `letter` blocks and their `group`, params)."""
  _require(config, "use_bias", lambda v: not v, "ssm_lab's Mamba-2 projections have no bias",
           False)
  _require(config, "hidden_act", lambda v: v == "silu", "Mamba-2 uses silu", "silu")
  limit = [_float(v) for v in config.get("time_step_limit", (0.0, float("inf")))]
  if limit[0] > 0.0 or math.isfinite(limit[1]):
    raise ValueError(f"config.json: time_step_limit={limit} is not supported (ssm_lab does not "
                     f"clamp dt)")
  n_layers, d = int(config["num_hidden_layers"]), int(config["hidden_size"])
  expand = int(config.get("expand", 2))
  head_dim = int(config.get("head_dim", 64))
  if int(config.get("num_heads", expand * d // head_dim)) * head_dim != expand * d:
    raise ValueError(f"config.json: num_heads={config.get('num_heads')} * head_dim={head_dim} must "
                     f"equal expand * hidden_size = {expand * d}")
  d_state, n_groups = int(config.get("state_size", 128)), int(config.get("n_groups", 1))
  kw = {"pattern": letter * n_layers, "d_model": d,
        group: dict(expand=expand, d_state=d_state, head_dim=head_dim, n_groups=n_groups,
                    d_conv=int(config.get("conv_kernel", 4)),
                    chunk_size=int(config.get("chunk_size", 256))),
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)), "block_mlp": False}
  conv_dim = expand * d + 2 * n_groups * d_state
  # ssm_lab's Mamba2Mixer keeps HF's names and in_proj order [z, x, B, C, dt]; its gated norm
  # normalises per group of d_inner / n_groups channels, as HF's MambaRMSNormGated does.
  params = _ssm_backbone(t)
  for i in range(n_layers):
    params[f"block_{i}"] = _ssm_block(t, i, conv_dim, lambda m: {
        "dt_bias": t.get(m + "dt_bias"),
        "norm": {"scale": t.get(m + "norm.weight")},
    })
  kw["tie_embeddings"], head = _head(t, config, "backbone.embeddings.weight")
  params.update(head)
  return kw, params


def convert_llama(config: dict[str, Any], t: Tensors, *, letter: str,
                  group: str) -> tuple[dict[str, Any], Params]:
  """LlamaForCausalLM -> (ModelArgs kwargs with `letter` blocks and their `group`, params)."""
  for field in ("attention_bias", "mlp_bias"):
    _require(config, field, lambda v: not v, "ssm_lab's projections have no bias", False)
  _require(config, "hidden_act", lambda v: v == "silu", "ssm_lab's MLP is SwiGLU (silu)", "silu")
  rope = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise ValueError(f"config.json: rope type {rope_type!r} is not supported (ssm_lab implements "
                     f"plain RoPE)")
  theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
  n_layers, d = int(config["num_hidden_layers"]), int(config["hidden_size"])
  heads = int(config["num_attention_heads"])
  kv_heads = int(config.get("num_key_value_heads") or heads)
  head_dim = int(config.get("head_dim") or d // heads)
  kw = {"pattern": letter * n_layers, "d_model": d,
        group: dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=theta),
        "block_mlp": True, "d_ff": int(config["intermediate_size"]),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6))}
  params: Params = {"embed": {"embedding": t.get("model.embed_tokens.weight")},
                    "final_norm": {"scale": t.get("model.norm.weight")}}
  for i in range(n_layers):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    by_head = lambda name, n, a=a: _linear(t, a + name).reshape(d, n, head_dim)
    params[f"block_{i}"] = {
        "mixer_norm": {"scale": t.get(p + "input_layernorm.weight")},
        "mixer": {"q_proj": {"kernel": by_head("q_proj.weight", heads)},
                  "k_proj": {"kernel": by_head("k_proj.weight", kv_heads)},
                  "v_proj": {"kernel": by_head("v_proj.weight", kv_heads)},
                  "o_proj": {"kernel": _linear(t, a + "o_proj.weight").reshape(heads, head_dim,
                                                                               d)}},
        "mlp_norm": {"scale": t.get(p + "post_attention_layernorm.weight")},
        "mlp": {"gate": {"kernel": _linear(t, p + "mlp.gate_proj.weight")},
                "up": {"kernel": _linear(t, p + "mlp.up_proj.weight")},
                "down": {"kernel": _linear(t, p + "mlp.down_proj.weight")}},
    }
  kw["tie_embeddings"], head = _head(t, config, "model.embed_tokens.weight")
  params.update(head)
  return kw, params


# ------------------------------------------------------------------------------------------------
# Entry point


def _check_against_model(model: LanguageModel, params: Params, path: str) -> None:
  """Every parameter the model declares is present with its shape, and nothing else."""
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1), jnp.int32))["params"]
  flat_e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  flat_p = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  missing, extra = sorted(set(flat_e) - set(flat_p)), sorted(set(flat_p) - set(flat_e))
  if missing or extra:
    raise ValueError(f"{path}: converted parameters do not fit the model: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}")
  for k, v in flat_e.items():
    if tuple(flat_p[k].shape) != tuple(v.shape):
      raise ValueError(f"{path}: parameter {k} converted to shape {tuple(flat_p[k].shape)}, the "
                       f"model expects {tuple(v.shape)}")


def from_pretrained(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                    **model_overrides: Any) -> tuple[LanguageModel, Params]:
  """Loads a local Hugging Face checkpoint directory as (LanguageModel, params).

  Args:
    path: directory with config.json and safetensors weights (see the module docstring).
    dtype: compute dtype of the model, "float32" or "bfloat16".
    param_dtype: dtype the weights are cast to, "float32" or "bfloat16".
    **model_overrides: other ModelArgs fields that do not change the weights: model-level ones, or
      a mixer group's, merged into the checkpoint's group (e.g. `mamba=dict(impl="associative")`,
      `attention=dict(sliding_window=1024)`).

  Returns:
    (model, params) with model.apply({"params": params}, tokens) -> logits [batch, length, vocab].

  Raises:
    ValueError: not a model directory, an unsupported architecture or setting, or a checkpoint whose
      tensors do not fit the architecture (the message names the file, field or tensor).
  """
  path = os.path.expanduser(os.fspath(path))
  config = read_config(path)
  arch = _architecture(config)
  tensors = Tensors(path)
  kw, params = registry.hf_converters()[arch](config, tensors)
  vocab = int(params["embed"]["embedding"].shape[0])
  groups = registry.groups()
  clash = []
  for key, value in model_overrides.items():
    if key in groups and isinstance(kw.get(key), dict):
      clash += [f"{key}.{f}" for f in value if f in kw[key]]
      kw[key] = {**kw[key], **value}
    elif key in kw or key == "vocab_size":
      clash.append(key)
    else:
      kw[key] = value
  if clash:
    raise ValueError(f"from_pretrained: {sorted(clash)} come from {path}/config.json and cannot be "
                     f"overridden")
  args = ModelArgs(vocab_size=vocab, dtype=dtype, param_dtype=param_dtype, **kw)
  model = LanguageModel(args)
  _check_against_model(model, params, path)
  unused = sorted(set(tensors.names()) - tensors.used - {"lm_head.weight"})
  if unused:
    raise ValueError(f"{path}: {len(unused)} checkpoint tensors were not used, e.g. {unused[:5]}: "
                     f"the checkpoint has parts this {arch} import does not know")
  pdt = args.params_dtype
  params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32), pdt), params)
  return model, params
