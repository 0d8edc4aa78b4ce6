"""Multi-host start-up decisions and the multi-slice (DCN) mesh."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from lmtrain.config import ConfigError
from lmtrain.parallel import mesh as mesh_lib
from lmtrain.parallel.mesh import distributed_plan, hybrid_device_array, make_mesh

# ---------------------------------------------------------------------------------------------------------------
# jax.distributed start-up
# ---------------------------------------------------------------------------------------------------------------

SALLOC = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_NODELIST": "gpu[01-04]", "SLURM_PROCID": "0"}
SBATCH_NO_SRUN = {"SLURM_JOB_ID": "78", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "gpu01", "SLURM_PROCID": "0"}
SRUN_ONE = {"SLURM_JOB_ID": "79", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NODELIST": "gpu01",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
SRUN_FOUR = {"SLURM_JOB_ID": "80", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[01-02]",
             "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}

SINGLE_PROCESS = {
    "nothing": {},
    "salloc": SALLOC,
    "sbatch without srun": SBATCH_NO_SRUN,
    "srun -n 1": SRUN_ONE,
    "mpirun -n 1": {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"},
    "one TPU host": {"TPU_WORKER_HOSTNAMES": "t1v-n-0"},
    "JAX_NUM_PROCESSES=1": {"JAX_NUM_PROCESSES": "1", "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"},
    "forced single host": {**SRUN_FOUR, "LMTRAIN_SINGLE_HOST": "1"},
}


@pytest.mark.parametrize("name", list(SINGLE_PROCESS))
def test_single_process_environments_do_not_initialize(name, monkeypatch):
    env = SINGLE_PROCESS[name]
    assert not distributed_plan(env).initialize

    def boom(**kwargs):
        raise AssertionError(f"jax.distributed.initialize called for {name}")

    monkeypatch.setattr(jax.distributed, "initialize", boom)
    assert mesh_lib.maybe_initialize_distributed(env) is False


MULTI_PROCESS = {
    "srun -n 4": (SRUN_FOUR, {"num_processes": 4, "process_id": 3}),
    "mpirun -n 2": ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, {"num_processes": 2, "process_id": 1}),
    "TPU pod (GKE)": ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2"}, {}),
    "lmtrain launch on a TPU pod": ({"JAX_NUM_PROCESSES": "4"}, {"num_processes": 4}),
    "explicit coordinator": (
        {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000"},
        {"num_processes": 2, "process_id": 1, "coordinator_address": "127.0.0.1:5000"},
    ),
    "coordinator only": ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476"}, {}),
}


@pytest.mark.parametrize("name", list(MULTI_PROCESS))
def test_multi_process_environments_initialize_with_their_arguments(name, monkeypatch):
    env, expected = MULTI_PROCESS[name]
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    before = jax.config.jax_enable_preemption_service
    try:
        assert mesh_lib.maybe_initialize_distributed(env) is True
        # JAX's preemption service would take SIGTERM from the trainer's handler (no checkpoint on preemption).
        assert jax.config.jax_enable_preemption_service is False
    finally:
        jax.config.update("jax_enable_preemption_service", before)
    assert calls == [expected]


def test_salloc_with_several_tasks_says_to_use_srun(capsys):
    plan = distributed_plan(SALLOC)
    assert not plan.initialize and "srun" in plan.note and "4 tasks" in plan.note
    assert not distributed_plan(SBATCH_NO_SRUN).note  # one task asked, one process run: nothing to say


def test_bad_process_count_and_failed_initialize_are_one_line_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_SIZE='two'"):
        distributed_plan({"OMPI_COMM_WORLD_SIZE": "two"})

    def fails(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fails)
    with pytest.raises(ConfigError, match=r"OMPI_COMM_WORLD_SIZE=2\): coordinator_address should be defined\. .*"
                                          "JAX_COORDINATOR_ADDRESS"):
        mesh_lib.maybe_initialize_distributed({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})


def test_single_process_environments_start_jax_for_real():
    """The reported crash: each environment, in a fresh process, starts JAX as one process."""
    script = (
        "import os, sys, json\n"
        "from lmtrain.parallel.mesh import maybe_initialize_distributed\n"
        "cases = json.loads(sys.argv[1])\n"
        "for env in cases:\n"
        "    os.environ.update(env)\n"
        "    assert maybe_initialize_distributed() is False, env\n"
        "    for k in env: del os.environ[k]\n"
        "import jax\n"
        "print('processes', jax.process_count(), 'devices', jax.device_count())\n"
    )
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_", "TPU_", "LMTRAIN_"))}
    env["JAX_PLATFORMS"] = "cpu"
    cases = [SALLOC, SBATCH_NO_SRUN, SRUN_ONE, SINGLE_PROCESS["mpirun -n 1"]]
    out = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "processes 1 devices" in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# Multi-slice meshes
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """Enough of a jax Device for mesh_utils: the ids and the slice a TPU chip belongs to."""

    id: int
    process_index: int
    slice_index: int | None
    platform: str = "cpu"  # 'cpu' keeps mesh_utils from reading physical TPU coordinates
    device_kind: str = "fake"


def fake_slices(n_slices: int, per_slice: int, hosts_per_slice: int = 2, with_slice_index: bool = True) -> list:
    devices = []
    for s in range(n_slices):
        for i in range(per_slice):
            host = s * hosts_per_slice + i * hosts_per_slice // per_slice
            devices.append(FakeTpu(s * per_slice + i, host, s if with_slice_index else None))
    return devices


@pytest.mark.parametrize("shape,n_slices", [((4, 2, 2), 2), ((8, 2, 1), 4), ((2, 4, 2), 2), ((3, 1, 2), 3)])
def test_hybrid_mesh_keeps_each_slice_together(shape, n_slices):
    per_slice = int(np.prod(shape)) // n_slices
    devices = fake_slices(n_slices, per_slice)
    random.Random(0).shuffle(devices)  # jax.devices() need not list a slice's devices together
    arr = hybrid_device_array(shape, n_slices, devices)
    assert arr.shape == shape
    assert sorted(d.id for d in arr.flat) == sorted(d.id for d in devices)  # each device once
    rows = shape[0] // n_slices
    for i in range(shape[0]):
        # A data row (all its fsdp x tensor devices) lies in one slice, and slices take contiguous rows in order:
        # fsdp and tensor collectives stay on ICI, only the data all-reduce crosses DCN.
        assert {d.slice_index for d in arr[i].flat} == {i // rows}


def test_hybrid_mesh_falls_back_to_processes_without_slice_index():
    devices = fake_slices(2, 4, hosts_per_slice=1, with_slice_index=False)[::-1]
    arr = hybrid_device_array((4, 2, 1), 2, devices)
    for i in range(4):
        assert {d.process_index for d in arr[i].flat} == {i // 2}


def test_hybrid_mesh_rejects_what_does_not_fit():
    devices = fake_slices(2, 4)
    with pytest.raises(ConfigError, match=r"mesh.data=3 does not divide over mesh.dcn_data=2"):
        hybrid_device_array((3, 1, 1), 2, devices[:3])
    with pytest.raises(ConfigError, match=r"mesh.dcn_data=4 but the 8 devices form 2 slices; .*dcn_data=2"):
        hybrid_device_array((4, 2, 1), 4, devices)
    with pytest.raises(ConfigError, match=r"needs 2 devices in each slice, but the slices have 4"):
        hybrid_device_array((2, 2, 1), 2, devices)
    with pytest.raises(ConfigError, match=r"needs 3 devices in each slice, but the slices have 3, 4"):
        hybrid_device_array((2, 1, 3), 2, devices[:3] + devices[4:])


def test_slice_count_is_the_default_dcn_size():
    assert mesh_lib.resolve_dcn_data(None, fake_slices(4, 2)) == 4
    assert mesh_lib.resolve_dcn_data(-1, fake_slices(1, 8)) == 1
    assert mesh_lib.resolve_dcn_data(-1, jax.devices()) == 1  # CPU devices carry no slice_index
    assert mesh_lib.resolve_dcn_data(2, jax.devices()) == 2


@pytest.mark.multidevice
def test_make_mesh_on_one_slice_is_unchanged_and_refuses_a_missing_slice():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = make_mesh((2, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 2, 2)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    with pytest.raises(ConfigError, match=r"mesh.dcn_data=2 but the 8 devices form 1 processes"):
        make_mesh((4, 2, 1), dcn_data=2)
