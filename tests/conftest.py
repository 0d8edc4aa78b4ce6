"""Test set-up: 8 fake CPU devices for the sharding tests, set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LMTRAIN_SINGLE_HOST", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
