"""GRPO's reward functions, named by `task.grpo_reward`: each scores a batch of completions, one float each.

- 'exact_match': 1.0 where the completion, stripped, equals the reference answer, stripped; else 0.0.
- 'regex:PATTERN': 1.0 where PATTERN's first match in the completion (its group 1 when it has groups) equals the
  reference answer, stripped: e.g. 'regex:=\\s*(-?\\d+)' accepts '= 12' and '... = 12.' for the answer '12'.
- 'module:function': a Python function, imported as `module.function`, called with (prompts, completions) as
  lists of strings, and `references=` (the data's reference answers) when its signature takes that keyword or
  **kwargs. It returns one number per completion.

A reward that cannot be imported, or returns the wrong number of values, is a ConfigError naming the key.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence

from lmtrain.errors import ConfigError

KEY = "task.grpo_reward"
RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]


def exact_match(prompts, completions, references) -> list[float]:
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references)]


def regex_match(pattern: str) -> RewardFn:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{KEY}='regex:{pattern}': not a regular expression ({e}).") from None

    def reward(prompts, completions, references) -> list[float]:
        out = []
        for completion, reference in zip(completions, references):
            found = compiled.search(completion)
            answer = (found.group(1) if compiled.groups else found.group(0)) if found else None
            out.append(float(answer is not None and answer.strip() == reference.strip()))
        return out

    return reward


def _import_function(spec: str) -> Callable:
    module_name, _, name = spec.rpartition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{KEY}='{spec}' cannot be imported ({type(e).__name__}: {e}). Give module:function of "
                          "a module on PYTHONPATH.") from None
    if not callable(fn):
        raise ConfigError(f"{KEY}='{spec}' is not a function.")
    return fn


def _takes_references(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "references" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def user_reward(spec: str) -> RewardFn:
    fn = _import_function(spec)
    with_references = _takes_references(fn)

    def reward(prompts, completions, references):
        return fn(list(prompts), list(completions), references=list(references)) if with_references \
            else fn(list(prompts), list(completions))

    return reward


def make_reward(spec: str) -> RewardFn:
    """The reward function `task.grpo_reward` names, wrapped so that its output is checked (`checked`)."""
    if spec == "exact_match":
        fn = exact_match
    elif spec.startswith("regex:"):
        fn = regex_match(spec[len("regex:"):])
    else:
        fn = user_reward(spec)
    return lambda prompts, completions, references: checked(spec, fn(prompts, completions, references),
                                                             len(completions))


def checked(spec: str, values, n: int) -> list[float]:
    """One finite float per completion, or a ConfigError saying what the reward returned instead."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{KEY}='{spec}' returned {type(values).__name__}, not one number per completion.") from None
    if len(out) != n:
        raise ConfigError(f"{KEY}='{spec}' returned {len(out)} values for {n} completions; return one float per "
                          "completion.")
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{KEY}='{spec}' returned a value that is not finite; rewards must be finite numbers.")
    return out
