"""Build the (data, fsdp, tensor) device mesh, over one slice or several, and start multi-host JAX when the
environment shows more than one process."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from lmtrain.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


# ----------------------------------------------------------------------------------------------------------------
# Multi-host start-up
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """Whether to call jax.distributed.initialize(), why, and the arguments the environment fixes."""

    initialize: bool
    reason: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    note: str = ""  # printed when the environment promised more processes than were started


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    raw = env.get(key, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r} is not an integer; fix or unset it.") from None


def distributed_plan(env: Mapping[str, str]) -> DistributedPlan:
    """Decide from launcher variables alone whether this process is one of several.

    A launcher's variables can be present while it started only one process: `salloc`, or `sbatch` whose
    script runs python without `srun`, keep SLURM_JOB_ID and SLURM_NTASKS; `mpirun -n 1` sets
    OMPI_COMM_WORLD_SIZE=1. jax.distributed.initialize() then fails (it cannot find a step node list or a
    coordinator), so we initialize only when more than one process is shown.
    """
    if env.get("LMTRAIN_SINGLE_HOST") == "1":
        return DistributedPlan(False, "LMTRAIN_SINGLE_HOST=1")

    # Our own convention (the TPU launcher, the multi-process tests): JAX itself reads only the coordinator.
    n = _env_int(env, "JAX_NUM_PROCESSES")
    if n is not None:
        if n <= 1:
            return DistributedPlan(False, f"JAX_NUM_PROCESSES={n}")
        kwargs: dict[str, Any] = {"num_processes": n}
        if (pid := _env_int(env, "JAX_PROCESS_ID")) is not None:
            kwargs["process_id"] = pid
        if env.get("JAX_COORDINATOR_ADDRESS"):
            kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        return DistributedPlan(True, f"JAX_NUM_PROCESSES={n}", kwargs)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return DistributedPlan(True, f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}")

    if env.get("SLURM_JOB_ID"):
        # SLURM_STEP_* exist only inside an srun step; SLURM_NTASKS alone describes the allocation.
        in_step = "SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_NODELIST" in env
        if not in_step:
            tasks = _env_int(env, "SLURM_NTASKS") or 1
            note = (f"lmtrain: this SLURM job has {tasks} tasks but this process was not started by srun; running "
                    "as one process. Put `srun` before the command to start one process per task.") if tasks > 1 else ""
            return DistributedPlan(False, "SLURM allocation without srun: one process", note=note)
        n = _env_int(env, "SLURM_STEP_NUM_TASKS")
        n = _env_int(env, "SLURM_NTASKS") if n is None else n
        if n is None or n <= 1:
            return DistributedPlan(False, f"srun step of {n or 1} task: one process")
        kwargs = {"num_processes": n}
        if (pid := _env_int(env, "SLURM_PROCID")) is not None:
            kwargs["process_id"] = pid
        return DistributedPlan(True, f"SLURM step with SLURM_STEP_NUM_TASKS={n}", kwargs)

    n = _env_int(env, "OMPI_COMM_WORLD_SIZE")
    if n is not None:
        if n <= 1:
            return DistributedPlan(False, f"OMPI_COMM_WORLD_SIZE={n}")
        kwargs = {"num_processes": n}
        if (pid := _env_int(env, "OMPI_COMM_WORLD_RANK")) is not None:
            kwargs["process_id"] = pid
        return DistributedPlan(True, f"OMPI_COMM_WORLD_SIZE={n}", kwargs)

    for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = env.get(key, "")
        if "," in hosts:
            return DistributedPlan(True, f"{key} lists {len(hosts.split(','))} hosts")
        if hosts:
            return DistributedPlan(False, f"{key} lists one host")
    return DistributedPlan(False, "no multi-process launcher in the environment")


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Call jax.distributed.initialize() when the environment shows more than one process. Returns True if
    JAX runs distributed after the call."""
    if jax.distributed.is_initialized():  # a second train() in the same process
        return True
    plan = distributed_plan(os.environ if env is None else env)
    if plan.note:
        print(plan.note, file=sys.stderr, flush=True)
    if not plan.initialize:
        return False
    # CPU processes need a collectives backend to talk to each other (tests, CPU clusters); accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service replaces the process's SIGTERM handler with its own (preemption_notifier.cc), so
    # the trainer's handler never runs and a preempted or time-limited job is killed without its checkpoint.
    # lmtrain agrees on a stop step across hosts itself (train/actions.HostAgreement).
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(**plan.kwargs)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"jax.distributed.initialize() failed ({plan.reason}): {first}. Set JAX_COORDINATOR_ADDRESS=HOST:PORT "
            "of process 0 (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), or LMTRAIN_SINGLE_HOST=1 to run as one process."
        ) from None
    return True


# ----------------------------------------------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------------------------------------------


def device_granules(devices: Sequence[Any]) -> tuple[str, dict[int, list]]:
    """Group devices by the unit the slow network (DCN) joins: TPU slices (`slice_index`), or, on platforms
    that do not set it, processes. Returns the attribute used and {key: devices}."""
    attr = "slice_index" if all(getattr(d, "slice_index", None) is not None for d in devices) else "process_index"
    groups: dict[int, list] = collections.defaultdict(list)
    for d in devices:
        groups[getattr(d, attr)].append(d)
    return attr, dict(groups)


def count_slices(devices: Sequence[Any]) -> int:
    """Number of TPU slices among `devices`; 1 where devices carry no slice_index (CPU, GPU, one slice)."""
    attr, groups = device_granules(devices)
    return len(groups) if attr == "slice_index" else 1


def hybrid_device_array(shape: tuple[int, int, int], dcn_data: int, devices: Sequence[Any]) -> np.ndarray:
    """Devices arranged as `shape` = (data, fsdp, tensor) with the data axis split over `dcn_data` slices.

    Each slice owns a contiguous block of `data // dcn_data` rows; fsdp and tensor never leave a slice, so
    only the data-parallel gradient all-reduce crosses DCN. Raises ConfigError naming the mesh keys when the
    devices do not fit.
    """
    data, fsdp, tensor = shape
    if dcn_data < 1:
        raise ConfigError(f"mesh.dcn_data={dcn_data}: the number of slices must be positive (or -1 for all present).")
    if data % dcn_data:
        raise ConfigError(
            f"mesh.data={data} does not divide over mesh.dcn_data={dcn_data} slices; choose mesh.data as a "
            f"multiple of {dcn_data} (mesh.data=-1 takes all devices)."
        )
    attr, groups = device_granules(devices)
    unit = "slices" if attr == "slice_index" else "processes (the devices carry no slice_index)"
    if len(groups) != dcn_data:
        raise ConfigError(
            f"mesh.dcn_data={dcn_data} but the {len(devices)} devices form {len(groups)} {unit}; set "
            f"--config.mesh.dcn_data={len(groups) if attr == 'slice_index' else 1} (or -1 for the slices present)."
        )
    sizes = sorted({len(g) for g in groups.values()})
    per_slice = (data // dcn_data) * fsdp * tensor
    if sizes != [per_slice]:
        raise ConfigError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} over {dcn_data} slices needs {per_slice} devices in each "
            f"slice, but the slices have {', '.join(map(str, sizes))}; fsdp x tensor x data/dcn_data must equal the "
            "devices of one slice."
        )
    return mesh_utils.create_hybrid_device_mesh(
        (data // dcn_data, fsdp, tensor), (dcn_data, 1, 1), devices, process_is_granule=attr == "process_index"
    )


def resolve_dcn_data(dcn_data: int | None, devices: Sequence[Any]) -> int:
    """`mesh.dcn_data`: None or -1 mean one per slice present (1 off TPU multi-slice)."""
    if dcn_data is None or dcn_data == -1:
        return count_slices(devices)
    return int(dcn_data)


def make_mesh(shape: tuple[int, int, int], devices=None, dcn_data: int | None = None) -> Mesh:
    """A mesh over `devices` (all by default) with axes data, fsdp, tensor.

    The tensor axis is innermost so that tensor-parallel collectives stay on the fastest links. With several
    TPU slices (or `dcn_data` > 1) the data axis is split over slices with JAX's hybrid ICI/DCN mesh.
    """
    devices = jax.devices() if devices is None else devices
    n = math.prod(shape)
    # Auto axes: XLA's partitioner propagates shardings from parameters and `constrain` hints.
    auto = {"axis_types": (AxisType.Auto,) * len(MESH_AXES)}
    dcn = resolve_dcn_data(dcn_data, devices)
    if dcn > 1:
        if len(devices) != n:
            raise ConfigError(f"mesh of {n} devices over {dcn} slices must use all {len(devices)} devices present.")
        return Mesh(hybrid_device_array(tuple(shape), dcn, devices), MESH_AXES, **auto)
    if len(devices) == n:
        try:
            return jax.make_mesh(shape, MESH_AXES, devices=devices, **auto)
        except (ValueError, NotImplementedError, AssertionError):  # unusual topologies: plain reshape below
            pass
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES, **auto)
