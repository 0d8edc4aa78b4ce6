"""A fake `gcloud` for the TPU tests: it records every call and simulates queued resources and TPU VMs on
this machine.

State lives in $FAKE_GCLOUD_STATE (a directory):
  config.json    what the test asks for (all keys optional):
                   project             the default project ("fake-project")
                   provision_describes describes spent in WAITING_FOR_RESOURCES/PROVISIONING before ACTIVE (2)
                   workers             TPU VM workers (hosts) per resource (1)
                   devices_per_worker  fake CPU devices each worker's JAX sees (4)
                   fail_creates        the first N creations end in FAILED instead of ACTIVE (0)
                   fail_ssh            the first N `tpu-vm ssh` calls fail as an unreachable host does (0)
                   preempt             list of {"metrics": PATH, "after_step": N, "signal": "KILL", "state": "SUSPENDED",
                                       "on_command": "lmtrain.cli train"}: once a command containing on_command runs on
                                       the VM and PATH shows a step >= N, every process of that VM is killed and the
                                       queued resource goes to `state`, as a spot preemption does. One entry per
                                       preemption, used in order.
  calls.jsonl    one line per gcloud call: {"argv": [...]}
  worker_calls.jsonl  sudo / pip / uv calls made on the fake workers (never run for real)
  events.jsonl   creations, deletions, preemptions
  gcs/BUCKET/... the local stand-in for gs://BUCKET/...
  vms/NAME/worker-I/  each worker's home directory; a deleted or preempted VM loses it, as a real one does

`tpu-vm ssh --command` runs the command with bash on this machine, once per selected worker, in the worker's
home with TPU_WORKER_ID set, JAX on CPU with `devices_per_worker` devices, and tests/fake_gcloud/worker_bin first
on PATH (sudo, pip and uv are recorded, not run).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BOOL_FLAGS = {"spot", "reserved", "guaranteed", "quiet", "force", "async", "recurse", "dry-run", "internal-ip",
              "compress", "plain", "best-effort"}
WAITING = ["WAITING_FOR_RESOURCES", "PROVISIONING"]


def state_dir() -> Path:
    root = os.environ.get("FAKE_GCLOUD_STATE")
    if not root:
        sys.exit("fake gcloud: FAKE_GCLOUD_STATE is not set")
    return Path(root)


def config() -> dict:
    path = state_dir() / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def locked_state():
    """Read-modify-write of state.json under a file lock (the preemption watcher runs beside the calls)."""
    root = state_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = root / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {"qr": {}, "creates": 0, "preemptions": 0}
        yield state
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)


def append(name: str, record: dict) -> None:
    with open(state_dir() / name, "a") as f:
        f.write(json.dumps(record) + "\n")


def parse(args: list[str]) -> tuple[list[str], dict[str, str | bool], list[str]]:
    """gcloud-style arguments: positionals, --flag[=value] options, and what follows a bare `--`."""
    pos, flags, rest = [], {}, []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest = args[i + 1:]
            break
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            if eq:
                flags[key] = value
            elif key in BOOL_FLAGS:
                flags[key] = True
            else:
                i += 1
                flags[key] = args[i]
        else:
            pos.append(a)
        i += 1
    return pos, flags, rest


def fail(message: str, code: int = 1):
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    sys.exit(code)


def vm_home(name: str, worker: int) -> Path:
    return state_dir() / "vms" / name / f"worker-{worker}"


def vm_token(name: str, incarnation: int) -> str:
    return f"{state_dir()}|{name}|{incarnation}"


def kill_vm_processes(token: str, sig: int) -> int:
    """Kill every process started on the fake VM (they carry FAKE_TPU_VM=token), as the VM's loss would."""
    needle = f"FAKE_TPU_VM={token}".encode()
    killed = 0
    for _ in range(3):  # again, for children started during the scan
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in env:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), sig)
                    killed += 1
        time.sleep(0.05)
    return killed


# --------------------------------------------------------------------------------------------------------------
# queued-resources
# --------------------------------------------------------------------------------------------------------------


def qr_create(pos, flags):
    name = pos[0]
    cfg = config()
    with locked_state() as st:
        if name in st["qr"]:
            fail(f"ALREADY_EXISTS: queued resource {name} already exists.")
        st["creates"] += 1
        fails = st["creates"] <= cfg.get("fail_creates", 0)
        st["qr"][name] = {
            "state": "ACCEPTED",
            "pending": WAITING[-cfg.get("provision_describes", 2):] if cfg.get("provision_describes", 2) else [],
            "final": "FAILED" if fails else "ACTIVE",
            "accelerator_type": flags.get("accelerator-type"),
            "runtime_version": flags.get("runtime-version"),
            "node_id": flags.get("node-id", name),
            "zone": flags.get("zone"),
            "capacity": "spot" if flags.get("spot") else "reserved" if flags.get("reserved") else "on-demand",
            "incarnation": st["creates"],
            "workers": cfg.get("workers", 1),
            "port": free_port(),
            "watch_armed": 0,
        }
    append("events.jsonl", {"event": "created", "name": name, "capacity": st["qr"][name]["capacity"]})
    print(f"Create request issued for: [{name}]")


def qr_describe(pos, flags):
    name = pos[0]
    with locked_state() as st:
        qr = st["qr"].get(name)
        if qr is None:
            fail(f"NOT_FOUND: Resource 'projects/{flags.get('project', 'p')}/locations/{flags.get('zone')}/"
                 f"queuedResources/{name}' was not found")
        if qr["state"] not in ("ACTIVE", "FAILED", "SUSPENDED", "SUSPENDING"):
            if qr["pending"]:
                qr["state"] = qr["pending"].pop(0)
            else:
                qr["state"] = qr["final"]
                if qr["state"] == "ACTIVE":
                    for w in range(qr["workers"]):
                        vm_home(name, w).mkdir(parents=True, exist_ok=True)
        qr = dict(qr)
    fmt = flags.get("format", "")
    if fmt == "value(state.state)":
        print(qr["state"])
    else:
        print(json.dumps({"name": f"queuedResources/{name}", "state": {"state": qr["state"]},
                          "tpu": {"nodeSpec": [{"nodeId": qr["node_id"],
                                                "node": {"acceleratorType": qr["accelerator_type"],
                                                         "runtimeVersion": qr["runtime_version"]}}]}}))


def qr_delete(pos, flags):
    name = pos[0]
    with locked_state() as st:
        qr = st["qr"].pop(name, None)
        if qr is None:
            fail(f"NOT_FOUND: queued resource {name} was not found")
        if qr["state"] == "ACTIVE" and not flags.get("force"):
            st["qr"][name] = qr
            fail("FAILED_PRECONDITION: the queued resource has nodes; use --force to delete them too.")
    kill_vm_processes(vm_token(name, qr["incarnation"]), signal.SIGKILL)
    shutil.rmtree(state_dir() / "vms" / name, ignore_errors=True)
    append("events.jsonl", {"event": "deleted", "name": name, "state": qr["state"]})
    print(f"Deleted queued resource [{name}].")


def qr_list(pos, flags):
    with locked_state() as st:
        for name, qr in st["qr"].items():
            print(f"{name}\t{qr['zone']}\t{qr['state']}")


# --------------------------------------------------------------------------------------------------------------
# tpu-vm
# --------------------------------------------------------------------------------------------------------------


def active_vm(name: str) -> dict:
    with locked_state() as st:
        qr = st["qr"].get(name)
    if qr is None:
        fail(f"NOT_FOUND: node {name} was not found")
    if qr["state"] != "ACTIVE":
        print(f"ssh: connect to host {name}: No route to host (node state {qr['state']})", file=sys.stderr)
        sys.exit(255)
    return qr


def workers_of(flags, qr) -> list[int]:
    spec = str(flags.get("worker", "0"))
    if spec == "all":
        return list(range(qr["workers"]))
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    if any(w >= qr["workers"] for w in out):
        fail(f"INVALID_ARGUMENT: worker {spec} out of range for {qr['workers']} workers")
    return out


def worker_env(name: str, qr: dict, worker: int) -> dict:
    cfg = config()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMTRAIN_", "SLURM_", "OMPI_", "JAX_", "TPU_"))}
    env.update(
        HOME=str(vm_home(name, worker)),
        PATH=f"{HERE / 'worker_bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        TPU_WORKER_ID=str(worker),
        FAKE_TPU_VM=vm_token(name, qr["incarnation"]),
        FAKE_GCLOUD_DIR=str(HERE),
        FAKE_GCLOUD_PYTHON=os.environ.get("FAKE_GCLOUD_PYTHON", sys.executable),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={cfg.get('devices_per_worker', 4)}",
    )
    if qr["workers"] > 1:
        # What a real slice's metadata server tells JAX: where process 0 listens, and which process this is.
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{qr['port']}", JAX_PROCESS_ID=str(worker))
    return env


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_ssh(pos, flags):
    name = pos[0].split("@")[-1]
    qr = active_vm(name)
    with locked_state() as st:
        st["ssh_calls"] = st.get("ssh_calls", 0) + 1
        unreachable = st["ssh_calls"] <= config().get("fail_ssh", 0)
    if unreachable:
        print(f"ssh: connect to host {name} port 22: Connection timed out", file=sys.stderr)
        sys.exit(255)
    command = flags.get("command")
    if not command:
        fail("the fake gcloud runs only --command, not interactive shells", 2)
    maybe_arm_preemption(name, command)
    procs = [subprocess.Popen(["bash", "-c", command], cwd=vm_home(name, w), env=worker_env(name, qr, w),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=False)
             for w in workers_of(flags, qr)]
    code = 0
    for p in procs:
        out, _ = p.communicate()
        sys.stdout.write(out.decode(errors="replace"))
        code = max(code, p.returncode)
    sys.exit(code)


def vm_scp(pos, flags):
    *sources, dest = pos
    if ":" not in dest:
        fail("the fake gcloud copies only to the VM (SRC... NAME:DEST)", 2)
    name, _, remote = dest.partition(":")
    name = name.split("@")[-1]
    qr = active_vm(name)
    for w in workers_of(flags, qr):
        home = vm_home(name, w)
        target = home / remote.removeprefix("~/").lstrip("/") if remote not in ("", "~", "~/") else home
        for src in sources:
            src_path = Path(src)
            to = target / src_path.name if (target.is_dir() or remote.endswith("/") or remote in ("", "~")) else target
            if src_path.is_dir():
                if not flags.get("recurse"):
                    fail(f"{src} is a directory; pass --recurse", 2)
                shutil.copytree(src_path, to, dirs_exist_ok=True)
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src_path, to)


def vm_describe(pos, flags):
    name = pos[0]
    with locked_state() as st:
        qr = st["qr"].get(name)
    if qr is None or qr["state"] != "ACTIVE":
        fail(f"NOT_FOUND: node {name} was not found")
    print(json.dumps({"name": f"nodes/{name}", "state": "READY", "acceleratorType": qr["accelerator_type"],
                      "runtimeVersion": qr["runtime_version"],
                      "networkEndpoints": [{"ipAddress": f"10.0.0.{w + 2}", "port": 8470}
                                           for w in range(qr["workers"])]}))


# --------------------------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------------------------


def maybe_arm_preemption(name: str, command: str) -> None:
    plans = config().get("preempt", [])
    with locked_state() as st:
        qr = st["qr"][name]
        index = st["preemptions"] + qr["watch_armed"]
        if index >= len(plans) or plans[index].get("on_command", "lmtrain.cli train") not in command:
            return
        qr["watch_armed"] = 1
    subprocess.Popen([sys.executable, __file__, "__watch", name, str(index)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     env={**os.environ})


def max_step(metrics: Path) -> int:
    best = -1
    with contextlib.suppress(OSError):
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if "loss" in record:
                    best = max(best, int(record["step"]))
    return best


def watch(name: str, index: int) -> None:
    plan = config()["preempt"][index]
    deadline = time.time() + plan.get("timeout_s", 900)
    while time.time() < deadline:
        with locked_state() as st:
            qr = st["qr"].get(name)
        if qr is None or qr["state"] != "ACTIVE":
            return
        seen = max_step(Path(plan["metrics"]))
        if seen >= plan["after_step"]:
            killed = kill_vm_processes(vm_token(name, qr["incarnation"]), getattr(signal, f"SIG{plan.get('signal', 'KILL')}"))
            with locked_state() as st:
                st["qr"][name]["state"] = plan.get("state", "SUSPENDED")
                st["qr"][name]["watch_armed"] = 0
                st["preemptions"] += 1
            shutil.rmtree(state_dir() / "vms" / name, ignore_errors=True)
            append("events.jsonl", {"event": "preempted", "name": name, "step_seen": seen, "killed": killed,
                                    "final_step": max_step(Path(plan["metrics"]))})
            return
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------------------------
# storage (gs:// is a local directory) and the rest
# --------------------------------------------------------------------------------------------------------------


def local_of(url: str) -> Path:
    return state_dir() / "gcs" / url.removeprefix("gs://") if url.startswith("gs://") else Path(url)


def storage_cp(pos, flags):
    src, dst = local_of(pos[0]), local_of(pos[1])
    if not src.exists():
        fail(f"The following URLs matched no objects or files: {pos[0]}")
    if dst.is_dir():
        dst = dst / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def storage_cat(pos, flags):
    for url in pos:
        path = local_of(url)
        if not path.is_file():
            fail(f"The following URLs matched no objects or files:\n-{url}")
        sys.stdout.write(path.read_text())


def worker_tool(args: list[str]) -> None:
    """sudo / pip / uv on a fake worker: recorded, never run. `uv venv DIR` makes DIR/bin/python this Python."""
    tool, *rest = args
    append("worker_calls.jsonl", {"worker": os.environ.get("TPU_WORKER_ID"), "tool": tool, "args": rest})
    if tool == "uv" and rest[:1] == ["venv"]:
        target = parse(rest[1:])[0][-1]
        bin_dir = Path(os.path.expanduser(target)) / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for exe in ("python", "python3"):
            with contextlib.suppress(FileExistsError):
                (bin_dir / exe).symlink_to(os.environ["FAKE_GCLOUD_PYTHON"])


COMMANDS = {
    ("compute", "tpus", "queued-resources", "create"): qr_create,
    ("compute", "tpus", "queued-resources", "describe"): qr_describe,
    ("compute", "tpus", "queued-resources", "delete"): qr_delete,
    ("compute", "tpus", "queued-resources", "list"): qr_list,
    ("compute", "tpus", "tpu-vm", "ssh"): vm_ssh,
    ("compute", "tpus", "tpu-vm", "scp"): vm_scp,
    ("compute", "tpus", "tpu-vm", "describe"): vm_describe,
    ("storage", "cp"): storage_cp,
    ("storage", "cat"): storage_cat,
}


def main(argv: list[str]) -> None:
    if argv[:1] == ["__watch"]:
        return watch(argv[1], int(argv[2]))
    if argv[:1] == ["__worker_tool"]:
        return worker_tool(argv[1:])
    append("calls.jsonl", {"argv": argv})
    if argv[:3] == ["config", "get-value", "project"]:
        print(config().get("project", "fake-project"))
        return
    for words, fn in COMMANDS.items():
        if tuple(argv[: len(words)]) == words:
            pos, flags, _ = parse(argv[len(words):])
            return fn(pos, flags)
    fail(f"fake gcloud does not know: gcloud {' '.join(argv)}", 2)


if __name__ == "__main__":
    main(sys.argv[1:])
