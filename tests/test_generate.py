"""Decoding from a cache: prefill + token-by-token decode logits equal the full forward pass for
every layer type and for hybrids; samplers; generate(); the CLI on a trained run.

Tolerance: float32 models match the full forward pass to atol = rtol = 1e-5 (measured differences
are ~1e-7: the same ops, only the scan order of the recurrence and the softmax over a padded cache
differ; ~4e-6 on logits of size ~6 for the FFT convolutions of S4D and Hyena, whose full pass sums
in another order than the recurrence / history dot product of decoding); the bfloat16 model to
5e-2 (bf16 rounds activations to 8 bits of mantissa, and the decode path rounds at other places
than the full pass).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_lab import generate as gen
from ssm_lab.layers.mamba import MambaMixer, init_mamba_cache
from ssm_lab.models.lm import LanguageModel, ModelArgs

KEY = jax.random.PRNGKey(0)
ATOL = RTOL = 1e-5

CASES = {
    "attention": dict(pattern="AA", block_mlp=True),
    "attention_window_ring": dict(pattern="AA", attention=dict(sliding_window=3)),
    "mamba": dict(pattern="MM"),
    "hybrid_jamba_like": dict(pattern="MAM", block_mlp=True),
    "mamba2": dict(pattern="SS"),
    "hybrid_nemotron_like": dict(pattern="SFSA"),
    # multi-query attention, a ring buffer, an MLP-only block and an untied head in one stack
    "hybrid_window_mqa_mlp_untied": dict(pattern="AMFA", attention=dict(sliding_window=4,
                                                                        num_kv_heads=1),
                                         tie_embeddings=False),
    "s4d": dict(pattern="DD"),
    "s4d_no_gate_no_conv_scan": dict(pattern="DD", s4d=dict(gate=False, conv=False, impl="scan")),
    "hybrid_s4d_attention": dict(pattern="DA", block_mlp=True),
    "lstm": dict(pattern="LL"),
    "hybrid_lstm_attention_projected": dict(pattern="LA", lstm=dict(hidden=24)),
    "hybrid_gru_attention": dict(pattern="GAG", gru=dict(hidden=24)),
    "hyena": dict(pattern="HH"),
    "hybrid_hyena_attention": dict(pattern="HAF", block_mlp=True),
}


def random_params(model, tokens, seed=0):
  """Random parameters of `model`'s shapes, drawn in NumPy (compiling `model.init` costs seconds on
  CPU): N(0, 0.3) weights, scales near 1. Every value is finite, A = -exp(A_log) stays negative."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, KEY, tokens)["params"]

  def draw(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    x = rng.normal(0.0, 0.3, s.shape)
    if name == "scale":
      x = 1.0 + x
    return jnp.asarray(x, s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def make(pattern, **kw):
  base = dict(d_model=32, vocab_size=41, attention=dict(num_heads=4, num_kv_heads=2),
              mamba=dict(d_state=8), mamba2=dict(d_state=8, head_dim=16, n_groups=2, chunk_size=4))
  for k, v in kw.items():
    base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
  args = ModelArgs(pattern=pattern, **base)
  model = LanguageModel(args)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, args.vocab_size)
  return model, random_params(model, tokens), tokens


@functools.lru_cache(maxsize=None)
def jitted(model):
  return jax.jit(model.apply, static_argnames=("mode", "last_logits_only"))


def decode_all(model, params, tokens, prompt_len, chunk=1):
  """Logits for every position: prefill the first prompt_len tokens, then decode `chunk` at a time."""
  apply = jitted(model)
  cache = model.init_cache(tokens.shape[0], tokens.shape[1])
  logits, cache = apply({"params": params}, tokens[:, :prompt_len], cache=cache, mode="prefill")
  outs = [logits]
  for t in range(prompt_len, tokens.shape[1], chunk):
    step, cache = apply({"params": params}, tokens[:, t:t + chunk], cache=cache, mode="decode")
    outs.append(step)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_then_decode_equals_full_forward(name):
  model, params, tokens = make(**CASES[name])
  full = jitted(model)({"params": params}, tokens)
  decoded, cache = decode_all(model, params, tokens, prompt_len=5)
  np.testing.assert_allclose(decoded, full, atol=ATOL, rtol=RTOL)
  assert int(cache["index"]) == tokens.shape[1]


def test_one_token_prompt_then_decoding():
  # A prompt shorter than the conv kernel leaves part of the conv state as zero padding.
  model, params, tokens = make("MA")
  full = jitted(model)({"params": params}, tokens)
  decoded, _ = decode_all(model, params, tokens, prompt_len=1)
  np.testing.assert_allclose(decoded, full, atol=ATOL, rtol=RTOL)


def test_multi_token_decode_chunks_equal_full_forward():
  # Linear caches take several tokens per decode call (chunked prefill, speculative checks).
  model, params, tokens = make("MAS", block_mlp=True)
  full = jitted(model)({"params": params}, tokens)
  decoded, _ = decode_all(model, params, tokens, prompt_len=3, chunk=4)
  np.testing.assert_allclose(decoded, full, atol=ATOL, rtol=RTOL)


def test_bfloat16_decode_tracks_full_forward():
  model, params, tokens = make("MA", dtype="bfloat16")
  full = jitted(model)({"params": params}, tokens)
  decoded, _ = decode_all(model, params, tokens, prompt_len=4)
  np.testing.assert_allclose(decoded, full, atol=5e-2, rtol=5e-2)


def test_cache_sizes_ring_buffer_and_constant_ssm_state():
  args = ModelArgs(pattern="AMAS", d_model=32, vocab_size=41,
                   attention=dict(num_heads=4, num_kv_heads=2, sliding_window=6),
                   mamba2=dict(d_state=8, head_dim=16, n_groups=2))
  short, long_ = (LanguageModel(args).init_cache(3, n) for n in (4, 1000))
  assert short["blocks"]["block_0"]["k"].shape == (3, 4, 2, 8)     # max_len < window: linear
  assert long_["blocks"]["block_0"]["k"].shape == (3, 6, 2, 8)     # ring buffer of window size
  assert np.all(np.asarray(long_["blocks"]["block_0"]["pos"]) == -1)
  for cache in (short, long_):
    m = cache["blocks"]["block_1"]
    assert m["conv"].shape == (3, 3, 64) and m["ssm"].shape == (3, 64, 16)
    assert m["ssm"].dtype == jnp.float32
    s2 = cache["blocks"]["block_3"]
    assert s2["conv"].shape == (3, 3, 64 + 2 * 2 * 8) and s2["ssm"].shape == (3, 4, 16, 8)


def test_ring_buffer_holds_the_last_window_positions():
  model, params, tokens = make("A", attention=dict(sliding_window=3))
  _, cache = decode_all(model, params, tokens, prompt_len=5)   # 11 positions through 3 slots
  pos = np.asarray(cache["blocks"]["block_0"]["pos"])
  assert sorted(pos[0].tolist()) == [8, 9, 10]
  assert pos[0, 10 % 3] == 10


def test_mamba_layer_state_after_prefill_equals_state_after_decoding():
  layer = MambaMixer(d_model=16, d_state=4, d_conv=4)
  x = jax.random.normal(KEY, (2, 9, 16))
  params = jax.jit(layer.init)(KEY, x)
  apply = jax.jit(layer.apply, static_argnames=("mode",))
  empty = init_mamba_cache(2, 32, 4, 4, jnp.float32)
  y_full, whole = apply(params, x, cache=empty, mode="prefill")
  _, part = apply(params, x[:, :3], cache=empty, mode="prefill")
  ys = []
  for t in range(3, 9):
    y, part = apply(params, x[:, t:t + 1], cache=part, mode="decode")
    ys.append(y)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), y_full[:, 3:], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(part["conv"], whole["conv"], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(part["ssm"], whole["ssm"], atol=ATOL, rtol=RTOL)
  # The conv state holds the last d_conv - 1 conv inputs (the x half of in_proj).
  xz = x @ params["params"]["in_proj"]["kernel"]
  np.testing.assert_allclose(whole["conv"], xz[:, -3:, :32], atol=ATOL, rtol=RTOL)


def test_cache_mode_errors_name_the_problem():
  model, params, tokens = make("A", attention=dict(sliding_window=2))
  with pytest.raises(ValueError, match="needs head 'lm'.*cache"):
    model.apply({"params": params}, tokens, mode="decode")
  cache = model.init_cache(2, 20)
  _, cache = model.apply({"params": params}, tokens[:, :4], cache=cache, mode="prefill")
  with pytest.raises(ValueError, match="ring buffer takes one token"):
    model.apply({"params": params}, tokens[:, 4:6], cache=cache, mode="decode")
  with pytest.raises(ValueError, match="mode must be"):
    model.apply({"params": params}, tokens, cache=cache, mode="train")


def test_jitted_prefill_and_decode_step_follow_the_full_forward():
  model, params, tokens = make("MAM", block_mlp=True)
  full = jitted(model)({"params": params}, tokens)
  cache = gen.init_cache(model, 2, 11)
  logits, cache = gen.prefill(model, params, tokens[:, :6], cache)
  np.testing.assert_allclose(logits, full[:, 5], atol=ATOL, rtol=RTOL)
  for t in range(6, 11):
    logits, cache = gen.decode_step(model, params, tokens[:, t], cache)
    np.testing.assert_allclose(logits, full[:, t], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("pattern", ["AA", "MAS"])
def test_greedy_generate_equals_argmax_of_the_full_forward_loop(pattern):
  model, params, tokens = make(pattern, block_mlp=True)
  out = gen.generate(model, params, tokens[:, :4], 6, temperature=0.0)
  # The model is causal, so a full forward over a zero-padded row gives position t's logits.
  apply = jitted(model)
  seq = np.zeros((2, 10), np.int32)
  seq[:, :4] = tokens[:, :4]
  for t in range(4, 10):
    seq[:, t] = np.argmax(apply({"params": params}, jnp.asarray(seq))[:, t - 1], axis=-1)
  np.testing.assert_array_equal(out, seq[:, 4:])


def test_samplers():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.PRNGKey(3)
  assert np.all(gen.sample_logits(keys, logits, temperature=0.0) == 0)
  # top_k=1 and a tiny nucleus are greedy at any temperature.
  assert np.all(gen.sample_logits(keys, logits, temperature=5.0, top_k=1) == 0)
  assert np.all(gen.sample_logits(keys, logits, temperature=1.0, top_p=0.01) == 0)
  # top_k=2 never leaves the two most likely tokens; their ratio stays 5:3.
  s = np.asarray(gen.sample_logits(keys, logits, top_k=2))
  assert set(np.unique(s)) == {0, 1}
  assert abs(np.mean(s == 0) - 0.625) < 0.03
  # top_p=0.7: 0.5 alone is short of 0.7, so tokens 0 and 1 (0.8 together) form the nucleus.
  s = np.asarray(gen.sample_logits(keys, logits, top_p=0.7))
  assert set(np.unique(s)) == {0, 1}
  # Plain sampling follows the distribution.
  s = np.asarray(gen.sample_logits(keys, logits, temperature=1.0))
  np.testing.assert_allclose(np.bincount(s, minlength=4) / len(s), [0.5, 0.3, 0.15, 0.05],
                             atol=0.03)
  with pytest.raises(ValueError, match="top_p"):
    gen.sample_logits(keys, logits, top_p=0.0)


def test_sampled_generation_is_reproducible_and_in_vocab():
  model, params, tokens = make("MA")
  a = gen.generate(model, params, tokens[:, :3], 5, key=jax.random.PRNGKey(7), temperature=1.0,
                   top_k=10, top_p=0.9)
  b = gen.generate(model, params, tokens[:, :3], 5, key=jax.random.PRNGKey(7), temperature=1.0,
                   top_k=10, top_p=0.9)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (2, 5) and int(a.min()) >= 0 and int(a.max()) < 41
  with pytest.raises(ValueError, match="vocab_size"):
    gen.generate(model, params, tokens[:, :3] + 100, 2)


def test_parse_prompt():
  from ssm_lab.data.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  ids = gen.parse_prompt("hi", tok)
  assert ids == [tok.eos_id, ord("h"), ord("i")]
  assert gen.parse_prompt("hi", tok, bos=False) == [ord("h"), ord("i")]
  assert gen.parse_prompt("3, 17,5", None) == [3, 17, 5]
  with pytest.raises(ValueError, match="comma-separated token ids"):
    gen.parse_prompt("hello", None)


def test_cli_generates_from_a_run_directory(tmp_path, capsys):
  import ml_collections
  from ssm_lab import config as config_lib
  from ssm_lab.checkpoint import Checkpointer
  from ssm_lab.models import build_model
  # A run directory as ssm_lab.train writes it (config.json + an orbax checkpoint of the state).
  config = config_lib.base_config()
  config.task = ml_collections.ConfigDict(dict(name="mqar", vocab_size=32, seq_len=16,
                                               num_kv_pairs=2, num_eval_examples=8))
  config.model.pattern, config.model.d_model = "MA", 32
  config.model.attention.num_heads = config.model.attention.num_kv_heads = 2
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  model = build_model(config.model, vocab_size=32)
  params = random_params(model, jnp.zeros((1, 4), jnp.int32))
  ckpt = Checkpointer(str(workdir), keep=1, save_every=1)
  ckpt.save(3, {"params": params, "step": jnp.asarray(3)}, {"data_position": 3}, force=True)
  ckpt.wait()
  assert gen.main(["--workdir", str(workdir), "--prompt", "1,2,3", "--max_new_tokens", "5",
                   "--num_samples", "2"]) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line]
  assert len(lines) == 2
  ids = [[int(v) for v in line.split(",")] for line in lines]
  assert all(len(r) == 5 and all(0 <= v < 32 for v in r) for r in ids)
  assert ids[0] == ids[1]   # greedy by default: both samples agree
  expected = gen.generate(model, params, jnp.asarray([[1, 2, 3]]), 5)
  assert ids[0] == [int(v) for v in expected[0]]


def test_cache_memory_closed_form_equals_what_init_cache_allocates():
  from ssm_lab.models import cache_memory
  for kw in (dict(pattern="AMSF", block_mlp=True), dict(pattern="AA", sliding_window=16),
             dict(pattern="MSA", dtype="bfloat16", num_kv_heads=1),
             dict(pattern="DLHA", block_mlp=True),
             dict(pattern="DHLG", dtype="bfloat16", s4d=dict(conv=False), lstm=dict(hidden=24),
                  gru=dict(hidden=20))):
    attention = dict(num_heads=4, num_kv_heads=kw.pop("num_kv_heads", 2),
                     sliding_window=kw.pop("sliding_window", 0))
    args = ModelArgs(d_model=32, vocab_size=41, attention=attention,
                     mamba2=dict(d_state=8, head_dim=16, n_groups=2), **kw)
    for context in (5, 16, 100):
      per_seq = cache_memory.cache_bytes_per_sequence(args, context)
      # init_cache also holds the int32 step counter.
      assert per_seq["total"] * 3 + 4 == cache_memory.allocated_cache_bytes(args, 3, context)
  # Attention grows linearly with the context (until a window caps it); SSM states stay constant.
  t = ModelArgs(pattern="AA", d_model=32, vocab_size=41, attention=dict(num_heads=4, num_kv_heads=2))
  m = ModelArgs(pattern="MS", d_model=32, vocab_size=41, mamba2=dict(head_dim=16))
  w = ModelArgs(pattern="AA", d_model=32, vocab_size=41,
                attention=dict(num_heads=4, sliding_window=64))
  kv = lambda a, n: cache_memory.cache_bytes_per_sequence(a, n)["total"]
  assert kv(t, 2000) == 2 * kv(t, 1000) == 2 * 1000 * 2 * (2 * 2 * 8 * 4 + 4)
  assert kv(m, 10) == kv(m, 100000) > 0
  # S4D and the LSTM keep a constant state; Hyena's k * v history grows like a KV cache.
  r = ModelArgs(pattern="DL", d_model=32, vocab_size=41, lstm=dict(hidden=24))
  assert kv(r, 10) == kv(r, 100000) == 64 * 16 * 4 + 3 * 64 * 4 + 2 * 24 * 4
  h = ModelArgs(pattern="H", d_model=32, vocab_size=41)
  assert kv(h, 2000) - kv(h, 1000) == 1000 * 32 * 4
  assert cache_memory.cache_bytes_per_sequence(h, 10)["history"] == 10 * 32 * 4
  assert kv(w, 64) == kv(w, 100000) < kv(t, 100000)
  rows = cache_memory.cache_table({"t": t, "m": m}, [10, 20])
  assert [r["context"] for r in rows] == [10, 20, 10, 20] and rows[0]["kv"] > 0 == rows[2]["kv"]


def test_generation_benchmark_runs_without_ml_collections(tmp_path):
  # The GPU image lacks ml-collections: the benchmark must not need it. Its closed-form mode runs
  # on any machine.
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  code = ("import sys, runpy; sys.modules['ml_collections'] = None; "
          f"sys.argv = ['generation.py', '--out', {str(tmp_path)!r}, '--memory_model_only']; "
          f"runpy.run_path({str(root / 'benchmarks' / 'generation.py')!r}, run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                        cwd=root, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (tmp_path / "generation.md").read_text()
  assert "transformer-1.3b" in md and "Predicted decode ceiling" in md
  import json
  res = json.loads((tmp_path / "generation.json").read_text())
  rows = res["memory_model"]["rows"]
  assert rows["mamba-1.3b"][0] == rows["mamba-1.3b"][-1] < rows["transformer-1.3b"][0]
