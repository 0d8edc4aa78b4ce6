"""Plugins named in LMTRAIN_PLUGINS are imported once; a missing one is a clear ConfigError."""

import sys

import pytest

from lmtrain import plugins
from lmtrain.errors import ConfigError


def test_a_plugin_module_named_in_the_environment_is_imported_once(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_mod.py").write_text("import builtins\nbuiltins._lmtrain_plugin_hits = "
                                               "getattr(builtins, '_lmtrain_plugin_hits', 0) + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.ENV_VAR, " my_plugin_mod , ")
    import builtins

    try:
        assert plugins.load_plugins() == ["my_plugin_mod"]
        assert plugins.load_plugins() == ["my_plugin_mod"]
        assert builtins._lmtrain_plugin_hits == 1
    finally:
        sys.modules.pop("my_plugin_mod", None)
        plugins._loaded.discard("my_plugin_mod")
        del builtins._lmtrain_plugin_hits


def test_a_plugin_that_cannot_be_imported_names_the_module_and_the_variable(monkeypatch):
    monkeypatch.setenv(plugins.ENV_VAR, "no_such_lmtrain_plugin")
    with pytest.raises(ConfigError, match="LMTRAIN_PLUGINS names the plugin module 'no_such_lmtrain_plugin'"):
        plugins.load_plugins()


def test_the_command_line_reports_a_missing_plugin_in_one_line_with_exit_2():
    import subprocess

    from tests.core_fixtures import cli_env

    env = {**cli_env(), plugins.ENV_VAR: "no_such_lmtrain_plugin"}
    proc = subprocess.run([sys.executable, "-m", "lmtrain.cli", "eval", "x", "--data", "y"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "lmtrain eval: error: LMTRAIN_PLUGINS names the plugin module 'no_such_lmtrain_plugin'" in proc.stderr
