"""Process-level XLA settings, applied by the entry points before JAX starts its backends.

Nothing here imports JAX: XLA reads XLA_FLAGS once, when the first backend starts.
"""

from __future__ import annotations

import importlib.metadata
import os

# XLA:CPU's YNNPACK dot fusions run an MLP's backward matmuls ~20% faster and a GPT-2 124M train step
# 1.13x faster on 2 cores (BENCHMARKS.md). The flag is experimental, so it is set only on
# the jaxlib line where it was measured, and never over a user's own choice.
_CPU_DOT_FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
_MEASURED_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ()


def apply_xla_defaults() -> bool:
    """Add lmtrain's default XLA flags to XLA_FLAGS unless the user set them or opted out
    (LMTRAIN_XLA_DEFAULTS=0). Returns True when a flag was added."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("LMTRAIN_XLA_DEFAULTS") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    if _jaxlib_version()[:2] != _MEASURED_JAXLIB:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_DOT_FLAG}".strip()
    return True
