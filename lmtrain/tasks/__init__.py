"""Tasks: what is trained. The registry maps `task.name` to its module; a new task (dpo, mlm, ...)
is one new module and one line here."""

from __future__ import annotations

import importlib

from lmtrain.config import ConfigError
from lmtrain.tasks.base import Task

TASKS = {
    "lm": "lmtrain.tasks.lm:LanguageModelling",
    "sft": "lmtrain.tasks.sft:SupervisedFineTuning",
    "classify": "lmtrain.tasks.classify:Classification",
    "mlm": "lmtrain.tasks.mlm:MaskedLanguageModelling",
    "token_classify": "lmtrain.tasks.token_classify:TokenClassification",
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"task.name='{name}' is unknown. Choose one of: {', '.join(TASKS)}.")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_task(cfg) -> Task:
    return task_class(cfg.task.name)(cfg)


__all__ = ["TASKS", "Task", "make_task"]
