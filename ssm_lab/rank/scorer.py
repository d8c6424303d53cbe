"""A cross-encoder scorer: (query, document) texts -> one relevance score, from any source of weights.

Inputs are `query <sep> document <eos>` cut to `seq_len` tokens (`ssm_lab.data.ranking.task`), and the
score is read at the last real token (EOS pooling): a classifier head with one output gives it as is,
a 2-class head its log-odds. Sources:

  Scorer(model, params, tokenizer)   in memory (the study's fine-tuned models)
  Scorer.from_workdir(DIR)           an ssm_lab run directory: config.json, checkpoints/, and the
                                     tokenizer (tokenizer.json saved there, else config.task.tokenizer)
  Scorer.from_pretrained(DIR, TOK)   a Hugging Face directory (ssm_lab.models.from_pretrained) whose
                                     safetensors also hold a linear head `score.weight` [1 or 2,
                                     hidden] (and optionally `score.bias`), the layout of
                                     *ForSequenceClassification checkpoints; the head reads the final
                                     norm's output at the EOS token
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab.data.ranking.task import model_scores, pack_pairs
from ssm_lab.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_file


@functools.lru_cache(maxsize=16)
def _apply_fn(args: Any):
  """One compiled forward per architecture, shared by every Scorer of it (sweeps make many)."""
  from ssm_lab.models import LanguageModel  # noqa: PLC0415
  model = LanguageModel(args)
  return jax.jit(lambda p, x, m: model.apply({"params": p}, x, pad_mask=m))


class Scorer:
  """Scores (query, document) pairs with a classifier-head LanguageModel (EOS pooling)."""

  def __init__(self, model: Any, params: Any, tokenizer: Tokenizer, *, seq_len: int = 512,
               max_query_len: int = 64, batch_size: int = 64):
    if model.args.head != "classifier":
      raise ValueError(f"Scorer needs a model with head 'classifier' (EOS pooling), got "
                       f"{model.args.head!r}")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.seq_len, self.max_query_len, self.batch_size = seq_len, max_query_len, batch_size
    self._apply = _apply_fn(model.args)
    self._memo: dict[str, np.ndarray] = {}

  def _tokens(self, texts: list[str]) -> list[np.ndarray]:
    missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
    for t, ids in zip(missing, self.tokenizer.encode_batch(missing) if missing else [],
                      strict=True):
      self._memo[t] = ids
    return [self._memo[t] for t in texts]

  def encode(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """inputs [n, seq_len] int32 and pad_mask [n, seq_len] for (query text, document text) pairs."""
    return pack_pairs(self._tokens([q for q, _ in pairs]), self._tokens([d for _, d in pairs]),
                      tokenizer=self.tokenizer, seq_len=self.seq_len,
                      max_query_len=self.max_query_len)

  def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
    """Scores [len(pairs)] float64, computed in fixed-size batches (the last one padded)."""
    out = []
    size = self.batch_size
    for start in range(0, len(pairs), size):
      chunk = pairs[start:start + size]
      inputs, mask = self.encode(chunk + [chunk[-1]] * (size - len(chunk)))
      raw = np.asarray(jax.device_get(self._apply(self.params, jnp.asarray(inputs),
                                                  jnp.asarray(mask))))
      out.append(model_scores(raw)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros(0)

  # --- sources ---------------------------------------------------------------------------------

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, batch_size: int = 64,
                   seq_len: int | None = None) -> "Scorer":
    """The latest (or `step`) checkpoint of an ssm_lab run directory with a classifier head."""
    import ml_collections  # noqa: PLC0415

    from ssm_lab.models import build_model  # noqa: PLC0415
    from ssm_lab.runs import restore_params  # noqa: PLC0415

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"{config_path} not found: --checkpoint must be a run directory "
                              f"written by ssm_lab.train")
    with open(config_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    tok_file = Path(workdir) / "tokenizer.json"
    task = config.task
    if tok_file.is_file():
      tokenizer = load_tokenizer_file(tok_file, task.get("tokenizer", "workdir"))
    else:
      tokenizer = load_tokenizer(task.get("tokenizer", "bytes"), cache_dir=task.get("cache_dir", ""),
                                 data_dir=task.get("data_dir", ""),
                                 dataset_key=os.path.basename(str(task.get("dataset", ""))))
    if config.model.head != "classifier":
      raise ValueError(f"{config_path}: model.head={config.model.head!r}; a reranker needs "
                       f"'classifier' (fine-tune the backbone first)")
    num_classes = config.model.num_classes or (1 if task.get("loss", "pointwise") != "pointwise"
                                               else 2)
    model = build_model(config.model, vocab_size=tokenizer.vocab_size, num_classes=num_classes)
    _, params = restore_params(workdir, step)
    return cls(model, params, tokenizer,
               seq_len=seq_len or int(task.get("seq_len", 512)),
               max_query_len=int(task.get("max_query_len", 64)), batch_size=batch_size)

  @classmethod
  def from_pretrained(cls, path: str, tokenizer: str, *, seq_len: int = 512,
                      max_query_len: int = 64, batch_size: int = 64,
                      dtype: str = "float32") -> "Scorer":
    """A Hugging Face directory with a `score.weight` head (see the module docstring)."""
    from safetensors.numpy import load_file, save_file  # noqa: PLC0415

    from ssm_lab.models import LanguageModel, from_pretrained  # noqa: PLC0415
    from ssm_lab.models.lm import ModelArgs  # noqa: PLC0415

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"{path}: no *.safetensors files (--from_pretrained takes a Hugging "
                              f"Face model directory)")
    head: dict[str, np.ndarray] = {}
    for f in files:
      tensors = load_file(str(f))
      head.update({k: v for k, v in tensors.items() if k in ("score.weight", "score.bias")})
    if "score.weight" not in head:
      raise ValueError(f"{path}: no 'score.weight' tensor: the checkpoint has no reranking head "
                       f"(EOS pooling needs a linear head [1 or 2, hidden]); fine-tune it with "
                       f"ssm_lab.train first (a ranking config with train.init_from={path!r})")
    weight = np.asarray(head["score.weight"], np.float32)
    if weight.ndim != 2 or weight.shape[0] not in (1, 2):
      raise ValueError(f"{path}: score.weight has shape {weight.shape}; expected [1 or 2, hidden]")
    with tempfile.TemporaryDirectory() as tmp:
      # from_pretrained rejects tensors it does not convert: hand it the backbone alone.
      for f in files:
        rest = {k: v for k, v in load_file(str(f)).items() if not k.startswith("score.")}
        save_file(rest, os.path.join(tmp, f.name))
      for name in ("config.json", "model.safetensors.index.json"):
        if (Path(path) / name).is_file():
          text = (Path(path) / name).read_text()
          if name.endswith("index.json"):
            index = json.loads(text)
            index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                                   if not k.startswith("score.")}
            text = json.dumps(index)
          Path(tmp, name).write_text(text)
      lm, params = from_pretrained(tmp, dtype=dtype)
    args = ModelArgs(**{**lm.args.to_dict(), "head": "classifier",
                        "num_classes": int(weight.shape[0]), "pooling": "last"})
    params = {k: v for k, v in params.items() if k != "lm_head"}
    bias = np.asarray(head.get("score.bias", np.zeros(weight.shape[0])), np.float32)
    params["classifier"] = {"kernel": jnp.asarray(weight.T), "bias": jnp.asarray(bias)}
    tok = load_tokenizer(tokenizer) if not os.path.exists(tokenizer) else \
        load_tokenizer_file(Path(tokenizer), Path(tokenizer).stem)
    return cls(LanguageModel(args), params, tok, seq_len=seq_len, max_query_len=max_query_len,
               batch_size=batch_size)
