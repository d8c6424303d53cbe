"""Data: synthetic tasks, corpora and ranking collections behind the `Task` contract (base.py)."""

from ssm_lab.data.base import Batch, Task
from ssm_lab.data.registry import make_task, task_names

__all__ = ["Batch", "Task", "make_task", "task_names"]
