"""XLA defaults set by the entry points: added once, never over the user's choice, opt-out honoured."""

from lmtrain import runtime


def test_cpu_dot_flag_is_added_once_and_respects_the_user(monkeypatch):
    monkeypatch.setattr(runtime, "_jaxlib_version", lambda: runtime._MEASURED_JAXLIB)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("LMTRAIN_XLA_DEFAULTS", raising=False)
    assert runtime.apply_xla_defaults()
    import os

    flags = os.environ["XLA_FLAGS"]
    assert flags.startswith("--xla_force_host_platform_device_count=8 ") and runtime._CPU_DOT_FLAG in flags
    assert not runtime.apply_xla_defaults()  # already there: not added twice
    assert os.environ["XLA_FLAGS"] == flags

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")  # the user's own choice wins
    assert not runtime.apply_xla_defaults() and os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="

    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("LMTRAIN_XLA_DEFAULTS", "0")
    assert not runtime.apply_xla_defaults() and os.environ["XLA_FLAGS"] == ""


def test_unmeasured_jaxlib_gets_no_experimental_flag(monkeypatch):
    monkeypatch.setattr(runtime, "_jaxlib_version", lambda: (99, 0))
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("LMTRAIN_XLA_DEFAULTS", raising=False)
    assert not runtime.apply_xla_defaults()
    assert "ynn" not in __import__("os").environ["XLA_FLAGS"]
