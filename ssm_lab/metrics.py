"""TensorBoard event files written with the `tensorboard` package alone (no TensorFlow).

`SummaryWriter(logdir)` writes scalars, text and hyperparameters that TensorBoard's scalar, text and
hparams tabs read; `read_scalars(logdir)` reads them back (tests and the notebook use it).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata as hp_metadata, plugin_data_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class SummaryWriter:
  """Appends events to a TensorBoard event file in `logdir` (created if missing).

  The file is opened at the first event, so that a run that logs nothing (a rerun of a finished run)
  leaves no empty event file behind.
  """

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writer: EventFileWriter | None = None

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if self._writer is None:
      os.makedirs(self.logdir, exist_ok=True)
      self._writer = EventFileWriter(self.logdir)
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                       for k, v in scalars.items()])

  def text(self, step: int, tag: str, text: str) -> None:
    from tensorboard.plugins.text import metadata as text_metadata  # noqa: PLC0415
    from tensorboard.util import tensor_util  # noqa: PLC0415
    value = summary_pb2.Summary.Value(
        tag=tag, metadata=text_metadata.create_summary_metadata(display_name=tag, description=""),
        tensor=tensor_util.make_tensor_proto([text]))
    self._write(step, [value])

  def hparams(self, hparams: Mapping[str, Any], metric_tags: list[str]) -> None:
    """Writes the experiment and session-start records the hparams dashboard reads."""
    clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k) for k in clean],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags])
    start = plugin_data_pb2.SessionStartInfo(group_name=os.path.basename(self.logdir.rstrip("/")),
                                             start_time_secs=time.time())
    for k, v in clean.items():
      if isinstance(v, bool):
        start.hparams[k].bool_value = v
      elif isinstance(v, (int, float)):
        start.hparams[k].number_value = float(v)
      else:
        start.hparams[k].string_value = v
    for tag, content in ((hp_metadata.EXPERIMENT_TAG,
                          plugin_data_pb2.HParamsPluginData(experiment=experiment)),
                         (hp_metadata.SESSION_START_INFO_TAG,
                          plugin_data_pb2.HParamsPluginData(session_start_info=start))):
      meta = hp_metadata.create_summary_metadata(content)
      self._write(0, [summary_pb2.Summary.Value(tag=tag, metadata=meta,
                                                tensor=hp_metadata.NULL_TENSOR)])

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file in `logdir`, in step order."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa
  acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag))
          for tag in acc.Tags()["scalars"]}
