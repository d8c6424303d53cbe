"""ssm_lab.rank: grouped fine-tuning (LCE and BCE), the scorer from a workdir and from a Hugging
Face layout with a score head, re-ranking, interpolation, and the CLI as a subprocess with its
one-line errors. Fixtures: a BEIR collection of 3 train + 3 test queries and 10 documents, a
bytes tokenizer and a 1-block model, all written by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from ssm_lab.config import base_config
from ssm_lab.data.ranking import build_ranking_task
from ssm_lab.data.ranking.formats import read_trec_run
from ssm_lab.rank import Scorer, choose_weight, interpolate, metrics, rerank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = {f"d{i}": t for i, t in enumerate([
    "the cat sat on the mat", "dogs are loyal pets", "a cat and a dog play", "whales sing songs",
    "grey whales migrate", "songs about cats", "the mat is red", "pets need food",
    "dogs chase cats", "red songs of whales"])}
QUERIES = {"q1": "cat mat", "q2": "whales", "q3": "dog pets", "q4": "cats", "q5": "red mat",
           "q6": "songs"}
TRAIN = {"q1": {"d0": 1}, "q2": {"d3": 1, "d4": 1}, "q3": {"d1": 1}}
TEST = {"q4": {"d5": 1, "d8": 1}, "q5": {"d6": 1}, "q6": {"d3": 1, "d9": 1}}


@pytest.fixture
def collection(tmp_path, monkeypatch):
  root = tmp_path / "data" / "toy"
  (root / "qrels").mkdir(parents=True)
  monkeypatch.setenv("SSM_LAB_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("SSM_LAB_CACHE_DIR", str(tmp_path / "cache"))
  with open(root / "corpus.jsonl", "w") as f:
    for i, t in DOCS.items():
      f.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
  with open(root / "queries.jsonl", "w") as f:
    for i, t in QUERIES.items():
      f.write(json.dumps({"_id": i, "text": t}) + "\n")
  for split, q in (("train", TRAIN), ("test", TEST)):
    (root / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{a}\t{d}\t{g}\n" for a, ds in q.items()
                                                 for d, g in ds.items()))
  # A first stage over every document, scores by word overlap.
  lines = []
  for q, text in QUERIES.items():
    scored = sorted(DOCS, key=lambda d: (-len(set(text.split()) & set(DOCS[d].split())), d))
    lines += [f"{q} Q0 {d} {r} {10 - r}.0 overlap" for r, d in enumerate(scored, 1)]
  (root / "first.trec").write_text("\n".join(lines) + "\n")
  return root


def tiny_config(loss: str, steps: int = 3) -> ml_collections.ConfigDict:
  config = base_config()
  config.task = ml_collections.ConfigDict(dict(
      name="ranking", dataset="toy", tokenizer="bytes", seq_len=48, max_query_len=16,
      first_stage="first", rerank_depth=10, negatives_depth=10, group_size=4, dev_fraction=0.34,
      eval_split="test", loss=loss))
  m = config.model
  m.pattern, m.d_model, m.head, m.pooling = "M", 16, "classifier", "last"
  t = config.train
  t.batch_size, t.num_steps, t.learning_rate, t.warmup_steps = 8, steps, 1e-2, 1
  return config


def task_of(config):
  return build_ranking_task(**{k: v for k, v in config.task.items() if k != "name"}, progress=False)


def finetune(config, workdir, init_from=""):
  """Trains `config` through the one training loop (grouped loss, optional init_from); the trained
  (model, params)."""
  from ssm_lab.runs import load_run  # noqa: PLC0415
  from ssm_lab.train import train_and_evaluate  # noqa: PLC0415
  t = config.train
  t.eval_every = t.checkpoint_every = t.log_every = t.num_steps
  t.progress_bar, t.init_from = False, init_from
  train_and_evaluate(config, str(workdir))
  run = load_run(str(workdir))
  return run.model, run.params


@pytest.mark.parametrize("loss", ["lce", "bce"])
def test_grouped_finetune_learns_and_saves(collection, tmp_path, loss):
  config = tiny_config(loss, steps=4)
  task = task_of(config)
  assert task.kind == "group_ranking" and task.num_classes == 1
  batch = task.train_batch(0, 8)
  assert list(batch["labels"]) == [1, 0, 0, 0, 1, 0, 0, 0]  # whole groups, positive first
  model, params = finetune(config, tmp_path / "ft")
  scorer = Scorer.from_workdir(str(tmp_path / "ft"))
  pairs = [(QUERIES["q1"], DOCS["d0"]), (QUERIES["q1"], DOCS["d3"])]
  again = Scorer(model, params, task.tokenizer, seq_len=48, max_query_len=16).score(pairs)
  np.testing.assert_allclose(scorer.score(pairs), again, atol=1e-5)
  assert np.all(np.isfinite(again)) and again[0] != again[1]


def test_init_from_copies_the_backbone_and_names_mismatches(collection, tmp_path):
  """`train.init_from` starts the reranker from a language model's parameters (the head is new)."""
  from ssm_lab.checkpoint import Checkpointer  # noqa: PLC0415
  from ssm_lab.models import build_model  # noqa: PLC0415
  from ssm_lab.train import init_params_from  # noqa: PLC0415
  config = tiny_config("lce")
  task = task_of(config)
  lm_config = ml_collections.ConfigDict(config.to_dict())
  lm_config.model.head, lm_config.model.num_classes = "lm", 0
  lm = build_model(lm_config.model, vocab_size=task.vocab_size)
  lm_params = lm.init(jax.random.PRNGKey(7), np.zeros((1, 8), np.int32))["params"]
  lm_dir = tmp_path / "lm"
  lm_dir.mkdir()
  (lm_dir / "config.json").write_text(lm_config.to_json_best_effort())
  ckpt = Checkpointer(str(lm_dir), keep=1, save_every=1)
  ckpt.save(0, {"step": 0, "params": lm_params}, {"data_position": 0}, force=True)
  ckpt.close()
  config.train.num_steps, config.train.learning_rate = 1, 1e-9
  _, params = finetune(config, tmp_path / "ft", init_from=str(lm_dir))
  np.testing.assert_allclose(params["embed"]["embedding"], lm_params["embed"]["embedding"],
                             atol=1e-6)
  bad = jax.tree.map(lambda x: x, params)
  bad["embed"]["embedding"] = bad["embed"]["embedding"][:5]
  bad_dir = tmp_path / "bad"
  bad_dir.mkdir()
  (bad_dir / "config.json").write_text(lm_config.to_json_best_effort())
  ckpt = Checkpointer(str(bad_dir), keep=1, save_every=1)
  ckpt.save(0, {"step": 0, "params": jax.tree.map(lambda x: x, lm_params) | {
      "embed": {"embedding": lm_params["embed"]["embedding"][:5]}}}, {"data_position": 0},
      force=True)
  ckpt.close()
  with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\] has shape"):
    init_params_from(str(bad_dir), params)


def test_rerank_interpolate_and_weight(collection, tmp_path):
  config = tiny_config("lce")
  task = task_of(config)
  model, params = finetune(config, tmp_path / "ft")
  scorer = Scorer(model, params, task.tokenizer, seq_len=48, max_query_len=16, batch_size=4)
  first = read_trec_run(collection / "first.trec")
  run = rerank(scorer, QUERIES, DOCS, first, depth=5, progress=False)
  assert set(run) == set(QUERIES) and all(len(v) == 5 for v in run.values())
  assert interpolate(run, first, 0.0)["q1"] == pytest.approx(
      {d: (s - 5.0) / 4.0 for d, s in sorted(first["q1"].items(), key=lambda kv: -kv[1])[:5]})
  both = interpolate(run, first, 0.5)
  assert all(0.0 <= s <= 1.0 for v in both.values() for s in v.values())
  w = choose_weight(run, first, TEST)
  assert 0.0 <= w <= 1.0
  assert set(metrics(run, TEST)) == {"MRR@10", "nDCG@10", "MAP", "R@100"}


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "ssm_lab.rank", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=300, check=False)


def test_cli_end_to_end_and_errors(collection, tmp_path):
  config = tiny_config("lce")
  finetune(config, tmp_path / "ft")
  qrels = collection / "qrels" / "test.tsv"
  base = ["--checkpoint", str(tmp_path / "ft"), "--queries", str(collection / "queries.jsonl"),
          "--corpus", str(collection / "corpus.jsonl"), "--run", str(collection / "first.trec")]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = tmp_path / "out.trec"
  proc = _cli(*base, "--out", str(out), "--qrels", str(qrels), "--interpolate", "0.5",
              "--depth", "4", "--no_progress", env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert set(report) == {"first_stage", "reranker", "interpolated_w0.5"}
  written = read_trec_run(out)
  assert set(written) == set(QUERIES) and all(len(v) == 4 for v in written.values())
  # Bad input: one line naming the file (and line).
  bad_run = tmp_path / "bad.trec"
  bad_run.write_text("q1 Q0 d0 1 1.0 x\nq1 Q0 d1 2\n")
  proc = _cli(*base[:-2], "--run", str(bad_run), "--out", str(out), env=env)
  assert proc.returncode == 2 and f"{bad_run}:2:" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  proc = _cli(*base[:2], "--queries", str(tmp_path / "nope.jsonl"), *base[4:], "--out", str(out),
              env=env)
  assert proc.returncode == 2 and "nope.jsonl: no such file" in proc.stderr
  bad_q = tmp_path / "q.jsonl"
  bad_q.write_text('{"_id": "q1", "text": "x"}\n{not json\n')
  proc = _cli(*base[:2], "--queries", str(bad_q), *base[4:], "--out", str(out), env=env)
  assert proc.returncode == 2 and f"{bad_q}:2:" in proc.stderr


def test_from_pretrained_with_score_head(tmp_path):
  """A tiny Llama directory written with numpy (no torch) plus a score head loads and scores."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  rng = np.random.default_rng(0)
  d, heads, ff, vocab, layers = 16, 2, 32, 300, 2
  w = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
  tensors = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32),
             "score.weight": w(1, d)}
  for i in range(layers):
    p = f"model.layers.{i}."
    tensors.update({p + "input_layernorm.weight": np.ones(d, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                    p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(d, d),
                    p + "self_attn.v_proj.weight": w(d, d), p + "self_attn.o_proj.weight": w(d, d),
                    p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
                    p + "mlp.down_proj.weight": w(d, ff)})
  hf = tmp_path / "hf"
  hf.mkdir()
  save_file(tensors, str(hf / "model.safetensors"))
  (hf / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
      "hidden_size": d, "num_attention_heads": heads, "num_key_value_heads": heads,
      "num_hidden_layers": layers, "intermediate_size": ff, "vocab_size": vocab,
      "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True}))
  scorer = Scorer.from_pretrained(str(hf), "bytes", seq_len=32, batch_size=2)
  assert scorer.model.args.head == "classifier" and scorer.model.args.pattern == "AA"
  scores = scorer.score([("cat", "the cat sat"), ("dog", "whales sing"), ("x", "y")])
  assert scores.shape == (3,) and np.all(np.isfinite(scores))
  del tensors["score.weight"]
  save_file(tensors, str(hf / "model.safetensors"))
  with pytest.raises(ValueError, match="no 'score.weight'"):
    Scorer.from_pretrained(str(hf), "bytes")
