"""The errors a user's mistake raises. They live below every other module: `config` calls into modules for
validation (`param_rules`) that raise ConfigError without importing `config` back, and the core's evaluation
scores (lmtrain.tasks.scores) raise EvalError without importing the `lmtrain eval` tool."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key and says what to do."""


class EvalError(ValueError):
    """An evaluation request that cannot be answered. The message says what is wrong and what to do."""
