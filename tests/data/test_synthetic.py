"""Synthetic tasks: each example checked against its definition by brute force, and determinism."""

from __future__ import annotations

import itertools

import ml_collections
import numpy as np
import pytest

from ssm_lab.data import make_task
from ssm_lab.data.induction_heads import InductionHeads
from ssm_lab.data.mqar import MQAR
from ssm_lab.data.selective_copying import SelectiveCopying
from ssm_lab.data.word_problems import WordProblem, multiplication_table


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", [MQAR(vocab_size=64, seq_len=64, num_kv_pairs=8),
                                  SelectiveCopying(seq_len=64, num_tokens=8),
                                  InductionHeads(seq_len=64), WordProblem(seq_len=32)])
def test_deterministic_in_seed_and_step(task):
  a, b = task.train_batch(5, 4), task.train_batch(5, 4)
  assert _same(a, b)
  assert not np.array_equal(a["inputs"], task.train_batch(6, 4)["inputs"])
  assert set(a) == {"inputs", "targets", "loss_mask"}
  for v in a.values():
    assert v.shape == (4, task.seq_len)
  assert a["inputs"].max() < task.vocab_size and a["targets"].max() < task.vocab_size
  e1, e2 = list(task.eval_batches(3)), list(task.eval_batches(3))
  assert all(_same(x, y) for x, y in zip(e1, e2, strict=True))


def test_mqar_matches_zoology_definition():
  task = MQAR(vocab_size=64, seq_len=64, num_kv_pairs=8, random_non_queries=False)
  b = task.train_batch(0, 16)
  half = 32
  for x, y, m in zip(b["inputs"], b["targets"], b["loss_mask"], strict=True):
    keys, values = x[0:16:2], x[1:16:2]
    assert len(set(keys)) == 8 and len(set(values)) == 8   # both without replacement
    assert keys.min() >= 1 and keys.max() < half and values.min() >= half
    kv = dict(zip(keys, values, strict=True))
    scored = np.nonzero(m)[0]
    assert len(scored) == 8
    for j in scored:  # after each query key, the target is that key's value
      assert x[j] in kv and y[j] == kv[x[j]]


def test_mqar_query_slots_follow_the_power_law_without_replacement():
  # The vectorised draw (Gumbel top-k) against the per-example sampler it replaced: how often each
  # slot holds a query agrees within sampling noise.
  task = MQAR(vocab_size=64, seq_len=40, num_kv_pairs=4, power_a=0.3, random_non_queries=False)
  n, space, kv = 20000, task._space, task.num_kv_pairs
  b = task.generate(np.random.default_rng(0), n)
  offsets = np.nonzero(b["loss_mask"])[1] - 2 * kv       # 2 * slot, the query key's position
  ours = np.bincount(offsets // 2, minlength=space) / n
  rng = np.random.default_rng(1)
  ref = np.bincount(np.concatenate([rng.choice(space, kv, replace=False, p=task._gap_p)
                                    for _ in range(n)]), minlength=space) / n
  assert ours.sum() == pytest.approx(kv)
  np.testing.assert_allclose(ours, ref, atol=0.02)


def test_selective_copying_targets_are_the_data_tokens_in_order():
  task = SelectiveCopying(vocab_size=10, seq_len=40, num_tokens=5)
  b = task.train_batch(0, 32)
  for x, y, m in zip(b["inputs"], b["targets"], b["loss_mask"], strict=True):
    context = x[:35]
    data = context[context != 0]
    assert len(data) == 5 and data.max() <= 8 and data.min() >= 1
    assert (x[35:] == 9).all()                       # markers
    assert (m[35:] == 1).all() and m[:35].sum() == 0
    assert np.array_equal(y[35:], data)


def test_induction_heads_answer_follows_the_first_trigger():
  task = InductionHeads(vocab_size=8, seq_len=48, answer_len=2, eval_seq_len=96,
                        num_eval_examples=4)
  b = task.train_batch(0, 32)
  for x, y, m in zip(b["inputs"], b["targets"], b["loss_mask"], strict=True):
    trig = np.nonzero(x == 7)[0]
    assert len(trig) == 2 and trig[1] == 46          # one inside, one at the end
    answer = x[trig[0] + 1: trig[0] + 3]
    assert np.array_equal(np.nonzero(m)[0], [46, 47])
    assert np.array_equal(y[46:48], answer)
  ev = next(task.eval_batches(4))
  assert ev["inputs"].shape == (4, 96)


def _compose_brute(seq_of_perms):
  state = tuple(range(len(seq_of_perms[0])))
  out = []
  for g in seq_of_perms:
    state = tuple(g[state[x]] for x in range(len(state)))  # apply state, then g
    out.append(state)
  return out


@pytest.mark.parametrize("group,order,even", [("S5", 120, False), ("A5", 60, True)])
def test_word_problem_is_the_running_permutation_product(group, order, even):
  perms = [p for p in itertools.permutations(range(5))
           if not even or sum(p[i] > p[j] for i in range(5) for j in range(i + 1, 5)) % 2 == 0]
  assert len(perms) == order
  task = WordProblem(group=group, seq_len=20)
  assert task.vocab_size == order
  b = task.train_batch(3, 8)
  assert (b["loss_mask"] == 1).all()
  for x, y in zip(b["inputs"], b["targets"], strict=True):
    expect = _compose_brute([perms[i] for i in x])
    assert [perms[i] for i in y] == expect


@pytest.mark.parametrize("group,order,abelian", [("Z60", 60, True), ("A4xZ5", 60, False),
                                                 ("S3", 6, False)])
def test_group_tables_are_groups(group, order, abelian):
  t = multiplication_table(group)
  assert t.shape == (order, order)
  assert (t[0] == np.arange(order)).all() and (t[:, 0] == np.arange(order)).all()
  a, b, c = np.random.default_rng(0).integers(0, order, (3, 500))
  assert (t[t[a, b], c] == t[a, t[b, c]]).all()
  assert all(sorted(row) == list(range(order)) for row in t)   # Latin square: inverses exist
  assert (t == t.T).all() == abelian


def test_registry_builds_each_task_and_rejects_unknown_fields():
  for cfg in (dict(name="selective_copying", seq_len=64, num_tokens=4),
              dict(name="induction_heads", seq_len=32),
              dict(name="word_problem", group="A5", seq_len=8),
              dict(name="mqar", vocab_size=64, seq_len=64, num_kv_pairs=4)):
    task = make_task(ml_collections.ConfigDict(cfg))
    assert task.train_batch(0, 2)["inputs"].shape == (2, task.seq_len)
  with pytest.raises(ValueError, match=r"\['bogus'\] that task 'word_problem' does not take"):
    make_task(ml_collections.ConfigDict(dict(name="word_problem", bogus=1)))
  with pytest.raises(ValueError, match="not S<n>"):
    WordProblem(group="Q8")
