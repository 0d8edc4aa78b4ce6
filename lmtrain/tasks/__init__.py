"""Tasks: what is trained. The registry maps `task.name` to its class; a new task is one module and one line
here, or, from outside the package, one `register_task(name, cls)` call in a plugin module
(lmtrain.plugins). A task class (lmtrain.tasks.base.Task) declares everything about itself.

This module stays light (no JAX): lmtrain.config reads the tasks' config keys through it, and a task module
is imported only when its class is asked for.
"""

from __future__ import annotations

import importlib

from lmtrain.errors import ConfigError
from lmtrain.tasks.options import BUILTIN_OPTIONS, TaskOptions

TASKS = {
    "lm": "lmtrain.tasks.lm:LanguageModelling",
    "sft": "lmtrain.tasks.sft:SupervisedFineTuning",
    "classify": "lmtrain.tasks.classify:Classification",
    "mlm": "lmtrain.tasks.mlm:MaskedLanguageModelling",
    "token_classify": "lmtrain.tasks.token_classify:TokenClassification",
    "grpo": "lmtrain.tasks.grpo:GroupRelativePolicyOptimization",
    "seq2seq": "lmtrain.tasks.seq2seq:SequenceToSequence",  # encoder-decoder (model.arch='t5')
    "span_corruption": "lmtrain.tasks.span_corruption:SpanCorruption",  # encoder-decoder (model.arch='t5')
    "dpo": "lmtrain.tasks.dpo:DirectPreferenceOptimization",
    "orpo": "lmtrain.tasks.orpo:OddsRatioPreferenceOptimization",
    "reward": "lmtrain.tasks.reward:RewardModelling",
}
_registered: dict[str, type] = {}  # plugin tasks, by name


def register_task(name: str, cls: type) -> type:
    """Add a task from outside lmtrain (a plugin module calls this when imported). Its `task.name` is `name`."""
    if not (isinstance(cls, type) and issubclass(cls, __getattr__("Task"))):
        raise TypeError(f"register_task('{name}', {cls!r}): a task is a subclass of lmtrain.tasks.Task.")
    if name in TASKS or (name in _registered and _registered[name] is not cls):
        raise ValueError(f"task '{name}' is registered already; choose another name.")
    cls.name = name
    _registered[name] = cls
    return cls


def task_names() -> list[str]:
    return [*TASKS, *_registered]


def task_class(name: str) -> type:
    if name in _registered:
        return _registered[name]
    check_task_name(name)
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def check_task_name(name: str) -> None:
    if name not in TASKS and name not in _registered:
        raise ConfigError(f"task.name='{name}' is unknown. Choose one of: {', '.join(task_names())} (a plugin task "
                          "needs its module in LMTRAIN_PLUGINS).")


def make_task(cfg):
    return task_class(cfg.task.name)(cfg)


def task_options() -> list[type[TaskOptions]]:
    """The config options of every known task: the built-in ones, then the plugins' (without importing a task)."""
    return list(dict.fromkeys([*BUILTIN_OPTIONS, *(cls.options for cls in _registered.values())]))


def task_config_defaults() -> dict:
    """Every known task's own keys under `config.task`, with their defaults (base_config holds them all, so the
    same config files and --config.task.KEY= overrides work whichever task a config picks)."""
    defaults: dict = {}
    for options in task_options():
        for key, value in options.defaults.items():
            if key in defaults and defaults[key] != value:
                raise ConfigError(f"{options.__name__} gives config.task.{key} the default {value!r}, another task "
                                  f"{defaults[key]!r}; a task's own keys need their own names.")
            defaults[key] = value
    return defaults


def validate_task_config(cfg) -> None:
    """A known task.name, and every task's own keys hold valid values (a ConfigError names the key)."""
    check_task_name(cfg.task.name)
    for options in task_options():
        options.validate(cfg)


def eval_head(kind: str) -> str:
    """The model head the `lmtrain eval` scorer `kind` needs: the head of the task that declares that scorer."""
    for name in task_names():
        cls = task_class(name)
        if cls.eval_kind == kind:
            return cls.head
    raise ConfigError(f"no task declares the evaluation kind '{kind}'.")


def __getattr__(name: str):
    """`lmtrain.tasks.Task`, the base class, loaded (with the model code) only when asked for."""
    if name == "Task":
        return importlib.import_module("lmtrain.tasks.base").Task
    raise AttributeError(f"module 'lmtrain.tasks' has no attribute '{name}'")


__all__ = ["Task", "TASKS", "eval_head", "make_task", "register_task", "task_class", "task_config_defaults",
           "validate_task_config"]
