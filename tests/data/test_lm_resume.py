"""End to end with the training loop: a resumed LM run continues with the next batch, not the first."""

from __future__ import annotations

import json

import ml_collections
import numpy as np

from ssm_lab import config as config_lib
from ssm_lab import train
from ssm_lab.data import lm


def test_resumed_lm_run_reads_the_batches_of_an_uninterrupted_run(dirs, tmp_path, monkeypatch):
  data, _ = dirs
  (data / "toy").mkdir()
  rng = np.random.default_rng(0)
  for split, n in (("train", 60), ("valid", 10)):
    with open(data / "toy" / f"{split}.jsonl", "w") as f:
      for _ in range(n):
        f.write(json.dumps({"text": " ".join(rng.choice(["ab", "cd", "ef"], 30))}) + "\n")
  config = config_lib.base_config()
  config.task = ml_collections.ConfigDict(dict(name="lm", dataset="toy", seq_len=16,
                                               eval_sequences=4, progress=False))
  config.model.pattern = "M"
  config.model.d_model = 16
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps = 4, 6, 1
  t.log_every, t.eval_every, t.checkpoint_every, t.progress_bar = 2, 6, 3, False

  seen: list[tuple[int, bytes]] = []
  original = lm.LMTask.train_batch

  def recording(self, step, batch_size):
    batch = original(self, step, batch_size)
    if batch_size == t.batch_size:
      seen.append((step, batch["inputs"].tobytes()))
    return batch

  monkeypatch.setattr(lm.LMTask, "train_batch", recording)
  train.train_and_evaluate(config, str(tmp_path / "run"), stop_at=3)   # preempted after 3 steps
  assert [s for s, _ in seen] == [0, 1, 2]
  seen.clear()
  train.train_and_evaluate(config, str(tmp_path / "run"))
  assert [s for s, _ in seen] == [3, 4, 5]                  # the next batches, not the first
  # ... holding the data an uninterrupted run reads at those steps.
  fresh = lm.build_lm_task("toy", seq_len=16, eval_sequences=4, progress=False)
  assert all(original(fresh, s, 4)["inputs"].tobytes() == b for s, b in seen)
  assert len({b for _, b in seen}) == 3
  # The run keeps what it needs to be read back: its tokenizer and a description of its data.
  assert (tmp_path / "run" / "tokenizer.json").is_file()
  assert (tmp_path / "run" / "data.json").is_file()
