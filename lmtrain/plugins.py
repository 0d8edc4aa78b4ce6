"""Extensions from outside the package: modules that register tasks, data formats or model families.

A plugin is an importable module whose import registers what it adds through the public registries
(`lmtrain.tasks.register_task`, `lmtrain.data.formats.register_format`, ...). Every command loads them
before it reads a config, so a WORKDIR trained with a plugin task resumes, evaluates and exports with the
same plugin loaded. Two ways to name them:

- the environment: `LMTRAIN_PLUGINS=my_pkg.tasks,other_module` (comma-separated module names);
- an installed package's entry points, group `lmtrain.plugins` (each entry point names a module).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

from lmtrain.errors import ConfigError

ENV_VAR = "LMTRAIN_PLUGINS"
ENTRY_POINT_GROUP = "lmtrain.plugins"

_loaded: set[str] = set()


def plugin_modules() -> list[str]:
    """The plugin module names, environment first, then installed entry points, without repeats."""
    names = [n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()]
    names += [ep.value.split(":", 1)[0] for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return list(dict.fromkeys(names))


def load_plugins() -> list[str]:
    """Import every plugin module once; the names imported. A module that cannot be imported is the user's
    setting to fix, so it is a ConfigError naming the module and the variable, not a traceback."""
    names = plugin_modules()
    for name in names:
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"{ENV_VAR} names the plugin module '{name}', which cannot be imported ({e}). "
                              f"Put it on PYTHONPATH or remove it from {ENV_VAR}.") from e
        _loaded.add(name)
    return names
