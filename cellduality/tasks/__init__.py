"""The 2x2 task suite (identity x dynamics, classification x generation) and its dual tasks."""

from cellduality.tasks.build import (
    PreparedTasks,
    build_tasks,
    load_prepared,
    merge_prepared,
    part_meta,
    save_prepared,
)
from cellduality.tasks.common import RECORD_COLUMNS, TaskConfig
from cellduality.tasks.dual import dual_prompt, dual_score, forward_answer

__all__ = [
    "RECORD_COLUMNS",
    "PreparedTasks",
    "TaskConfig",
    "build_tasks",
    "dual_prompt",
    "dual_score",
    "forward_answer",
    "load_prepared",
    "merge_prepared",
    "part_meta",
    "save_prepared",
]
