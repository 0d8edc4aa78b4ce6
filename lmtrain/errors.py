"""The error a user's configuration raises. It lives below `config` so that modules `config` calls into for
validation (`param_rules`) can raise it without importing `config` back."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key and says what to do."""
