"""Build the (data, fsdp, tensor) device mesh and start multi-host JAX when the environment asks for it."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")

# Variables set by the launchers that run one process per host (Cloud TPU, SLURM, Open MPI, our own).
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> bool:
    """Call jax.distributed.initialize() when a multi-host launcher set its variables. Returns True if it ran."""
    if jax.distributed.is_initialized():  # a second train() in the same process
        return True
    if os.environ.get("LMTRAIN_SINGLE_HOST") == "1":
        return False
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    wants = any(os.environ.get(k) for k in _MULTIHOST_ENV if k != "TPU_WORKER_HOSTNAMES") or "," in hosts
    if not wants:
        return False
    jax.distributed.initialize()
    return True


def make_mesh(shape: tuple[int, int, int], devices=None) -> Mesh:
    """A mesh over `devices` (all by default) with axes data, fsdp, tensor.

    The tensor axis is innermost so that tensor-parallel collectives stay on the fastest links.
    """
    devices = jax.devices() if devices is None else devices
    n = int(np.prod(shape))
    # Auto axes: XLA's partitioner propagates shardings from parameters and `constrain` hints.
    auto = {"axis_types": (AxisType.Auto,) * len(MESH_AXES)}
    if len(devices) == n:
        try:
            return jax.make_mesh(shape, MESH_AXES, devices=devices, **auto)
        except (ValueError, NotImplementedError, AssertionError):  # unusual topologies: plain reshape below
            pass
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES, **auto)
