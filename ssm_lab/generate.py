"""Autoregressive generation from a decoding cache, for every layer pattern, and its CLI.

A Transformer's attention layers keep a KV cache that grows with the context (a ring buffer of window
size under a sliding window); Mamba and Mamba-2 layers keep a (conv, SSM) state of constant size. The
layers share their parameters and code with training (`mode=` of `LanguageModel`); this module wraps
them:

  cache = init_cache(model, batch, max_len)
  logits, cache = prefill(model, params, prompt, cache)      # logits of the prompt's last token
  logits, cache = decode_step(model, params, token, cache)   # one token per sequence
  tokens = generate(model, params, prompt, max_new_tokens, key=..., temperature=..., top_k=...,
                    top_p=...)                             # prefill + a jitted `lax.scan` of steps

Sampling: temperature 0 is greedy; otherwise logits / temperature, then optional top-k (keep the k
most likely) and top-p (nucleus: the smallest set of most likely tokens whose probability reaches p,
Holtzman et al. 2020) filters.

CLI, on a run written by `ssm_lab.train`:

  python -m ssm_lab.generate --workdir runs/x --prompt "Once upon a time" --max_new_tokens 64
  python -m ssm_lab.generate --workdir runs/mqar --prompt 3,17,5 --temperature 0

The prompt is text when the run's task has a tokenizer (`task.tokenizer`; its eos id, which opens
every training document, is put in front unless --no_bos) and comma-separated token ids otherwise.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssm_lab.models.lm import LanguageModel

Cache = dict[str, Any]


def init_cache(model: LanguageModel, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
  return model.init_cache(batch, max_len)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def prefill(model: LanguageModel, params: Any, prompt: jax.Array,
            cache: Cache) -> tuple[jax.Array, Cache]:
  """Runs `prompt` [batch, length] from position 0; returns (logits [batch, vocab] of its last
  token, the filled cache). `cache` (from init_cache, empty) is donated."""
  logits, cache = model.apply({"params": params}, prompt, cache=cache, mode="prefill",
                              last_logits_only=True)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode_step(model: LanguageModel, params: Any, token: jax.Array,
                cache: Cache) -> tuple[jax.Array, Cache]:
  """Feeds `token` [batch] at position cache["index"]; returns (logits [batch, vocab], cache).
  The cache passed in is donated (updated in place on the device)."""
  logits, cache = model.apply({"params": params}, token[:, None], cache=cache, mode="decode")
  return logits[:, -1], cache


def sample_logits(key: jax.Array, logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """One token per row of `logits` [batch, vocab] -> int32 [batch].

  temperature 0: argmax. Otherwise softmax(logits / temperature) restricted to the top_k most likely
  tokens (0 = all) and to the nucleus of probability top_p (1.0 = all).
  """
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got "
                     f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass of the tokens ranked above it is still short of top_p, so the
    # most likely token always stays.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "steps", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def decode_tokens(model: LanguageModel, params: Any, token: jax.Array, cache: Cache,
                  key: jax.Array, *, steps: int, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[jax.Array, Cache]:
  """`steps` decode steps in one compiled loop, starting by feeding `token` [batch]; returns (the
  `steps` tokens sampled [batch, steps] int32, the cache after feeding all but the last of them).
  The cache passed in is donated."""

  def body(carry, step_key):
    tok, c = carry
    logits, c = model.apply({"params": params}, tok[:, None], cache=c, mode="decode")
    nxt = sample_logits(step_key, logits[:, -1], temperature=temperature, top_k=top_k,
                        top_p=top_p)
    return (nxt, c), nxt

  (_, cache), toks = jax.lax.scan(body, (token, cache), jax.random.split(key, steps))
  return jnp.moveaxis(toks, 0, 1), cache


def generate(model: LanguageModel, params: Any, prompt: jax.Array, max_new_tokens: int, *,
             key: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0) -> jax.Array:
  """Continues each row of `prompt` [batch, length] int by `max_new_tokens` tokens.

  Returns int32 [batch, max_new_tokens]: the first from the prefill's last logits, the rest from
  `max_new_tokens - 1` jitted decode steps.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  vocab = model.args.vocab_size
  lo, hi = int(jnp.min(prompt)), int(jnp.max(prompt))
  if lo < 0 or hi >= vocab:
    raise ValueError(f"prompt token ids must lie in [0, {vocab}) (the model's vocab_size), got "
                     f"ids from {lo} to {hi}")
  key = jax.random.PRNGKey(0) if key is None else key
  first_key, rest_key = jax.random.split(key)
  cache = init_cache(model, prompt.shape[0], prompt.shape[1] + max_new_tokens)
  logits, cache = prefill(model, params, prompt, cache)
  first = sample_logits(first_key, logits, temperature=temperature, top_k=top_k, top_p=top_p)
  if max_new_tokens == 1:
    return first[:, None]
  rest, _ = decode_tokens(model, params, first, cache, rest_key, steps=max_new_tokens - 1,
                          temperature=temperature, top_k=top_k, top_p=top_p)
  return jnp.concatenate([first[:, None], rest], axis=1)


# ------------------------------------------------------------------------------------------------
# CLI


def parse_prompt(prompt: str, tokenizer: Any, *, bos: bool = True) -> list[int]:
  """Token ids of `prompt`: encoded text when `tokenizer` is given (its eos id first when `bos`),
  else comma-separated integers."""
  if tokenizer is not None:
    ids = [int(t) for t in tokenizer.encode(prompt)]
    return ([int(tokenizer.eos_id)] if bos else []) + ids
  try:
    ids = [int(p) for p in prompt.replace(" ", "").split(",") if p]
  except ValueError as err:
    raise ValueError(f"--prompt {prompt!r}: this run's task has no tokenizer, so the prompt must be "
                     f"comma-separated token ids (e.g. 3,17,5)") from err
  if not ids:
    raise ValueError("--prompt is empty")
  return ids


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m ssm_lab.generate", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a run directory written by ssm_lab.train")
  p.add_argument("--prompt", required=True,
                 help="text (task with a tokenizer) or comma-separated token ids")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top_k", type=int, default=0, help="0: no top-k filter")
  p.add_argument("--top_p", type=float, default=1.0, help="1.0: no nucleus filter")
  p.add_argument("--num_samples", type=int, default=1, help="continuations of the prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--no_bos", action="store_true", help="do not put the eos id before a text prompt")
  args = p.parse_args(argv)

  from ssm_lab.runs import load_run  # noqa: PLC0415 (ml-collections and orbax: the CLI only)

  run = load_run(args.workdir, args.step)
  if run.model.args.head != "lm":
    raise ValueError(f"{args.workdir}: the model has head {run.model.args.head!r}; generation needs "
                     f"an 'lm' head")
  tokenizer = getattr(run.task, "tokenizer", None)
  if tokenizer is not None and not callable(getattr(tokenizer, "encode", None)):
    tokenizer = None
  ids = parse_prompt(args.prompt, tokenizer, bos=not args.no_bos)
  prompt = jnp.asarray([ids] * args.num_samples, jnp.int32)
  start = time.perf_counter()
  out = np.asarray(generate(run.model, run.params, prompt, args.max_new_tokens,
                            key=jax.random.PRNGKey(args.seed), temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p))
  elapsed = time.perf_counter() - start
  for row in out:
    if tokenizer is not None:
      row = list(row)
      # The eos id opens the next document: the continuation ends there.
      row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
      print(args.prompt + tokenizer.decode([int(t) for t in row]))
    else:
      print(",".join(str(int(t)) for t in row))
  print(f"[{args.workdir} step {run.step}: {out.size} tokens in {elapsed:.2f} s including "
        f"compilation]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from ssm_lab import cli  # noqa: PLC0415 (one-line errors; --verbose for the traceback)
  sys.exit(cli.run("ssm_lab.generate", lambda: main(cli.strip_verbose(sys.argv[1:]))))
