"""Every accelerator measurement in one time-boxed run: one JSON and a Markdown table for BENCHMARKS.md.

Run through tools/device_check.sh (see BENCHMARKS.md, "Device check"):

    tools/device_check.sh                       # on a GPU machine: writes into $OUT
    tools/device_check.sh --out DIR --skip-install
    tools/device_check.sh --dry-run --out DIR   # the same pipeline on CPU with tiny shapes (seconds a measurement)

Each measurement is one process of an existing tool (tools/benchmark.py, tools/benchmark_lora.py,
tools/benchmark_dpo.py, tools/benchmark_serve.py, tools/profile_step.py) with the commands and shapes of
BENCHMARKS.md's GPU section, so the figures compare with the earlier ones. Each has its own timeout and the whole
run a budget (default 480 s, install included); a failure or a timeout is recorded and the rest go on. A
measurement of a feature this version may lack (tool "feature") is detected from lmtrain's own registries and
listed as not available; none of the current measurements is one.

This file uses the standard library only: it runs before lmtrain's dependencies are installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

REPO = pathlib.Path(__file__).resolve().parent.parent
STATUSES = ("ok", "failed", "timeout", "skipped", "not_available")
# Tiny shapes for --dry-run: every tool runs on CPU in seconds (plus compilation).
TINY = ["--config.data.batch_size=2", "--config.data.seq_len=32", "--config.model.n_layers=1"]
TINY_LORA = ["--set", "data.batch_size=2", "--set", "data.seq_len=32", "--set", "model.n_layers=1"]
DRY_PEAK_TFLOPS = "1"  # a nominal peak so that the dry run's MFU goes through the same arithmetic
ACCELERATORS = ("gpu", "tpu")  # jax.Device.platform on the machines the real shapes are for
MIN_STEP_S = 30  # a measurement is not started with less of the budget left than this


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measurement: a tool run (or a feature check) and how to read its result."""

    name: str
    title: str
    tool: str  # a key of TOOLS, or "feature" (not measured by this version)
    args: tuple[str, ...] = ()  # on the accelerator: BENCHMARKS.md's commands and shapes
    dry_args: tuple[str, ...] = ()  # --dry-run: the same tool on tiny shapes
    timeout_s: int = 120
    earlier: str = ""  # the figure BENCHMARKS.md has for the same command (H100)
    feature: tuple[str, str] = ("", "")  # tool "feature": (registry, key), e.g. ("tasks", "kto")


MEASUREMENTS = (
    Measurement("gpt2_small_dense", "gpt2_small, dense, as shipped (512 = 8 x 64 micro-batches, seq 1024)", "benchmark",
                ("--config=gpt2_small", "--steps=4", "--warmup=1"),
                ("--config=gpt2_small:runlocal", "--steps=2", "--warmup=1", *TINY), 150,
                "488,850 tokens/s, 42.3% MFU, 37.1 GiB"),
    Measurement("gpt2_small_packed", "gpt2_small, packed documents (segment mask), batch 32", "benchmark",
                ("--config=gpt2_small", "--steps=4", "--warmup=1", "--segments", "--config.data.batch_size=32",
                 "--config.train.grad_accum=1"),
                ("--config=gpt2_small:runlocal", "--steps=2", "--warmup=1", "--segments", *TINY), 120,
                "434,519 tokens/s, 37.6% MFU, 19.2 GiB"),
    Measurement("llama_1b", "llama_1b, 8 x 2048, scan, save_dots remat, bf16", "benchmark",
                ("--config=llama_1b", "--steps=4", "--warmup=1", "--config.data.batch_size=8"),
                ("--config=llama_1b:runlocal", "--steps=2", "--warmup=1", *TINY), 150,
                "59,745 tokens/s, 49.7% MFU, 34.5 GiB"),
    Measurement("llama_1b_lora_vs_full", "llama_1b LoRA (rank 16) vs full fine-tuning, fp32, 1 x 512", "lora",
                ("--shape", "llama_1b", "--rounds", "3", "--steps", "3"),
                ("--shape", "llama_1b:runlocal", "--rounds", "1", "--steps", "1", *TINY_LORA), 180,
                "none on a GPU yet (target: LoRA >= 1.3x full)"),
    Measurement("dpo_vs_sft_step", "gpt2_small, 8 x 1024: DPO step (full and LoRA rank 16) vs SFT step", "dpo",
                ("--config=gpt2_small", "--batch-size", "8", "--seq-len", "1024", "--steps", "5", "--lora-rank", "16"),
                ("--config=tiny", "--batch-size", "2", "--seq-len", "32", "--steps", "1", "--lora-rank", "4"), 180,
                "none on a GPU yet"),
    Measurement("serve_concurrency_16", "lmtrain serve, random GPT-2 124M, concurrency 16, 64 x (128 in, 64 out)",
                "serve", ("--shape", "gpt2_small", "--concurrency", "16", "--requests", "64"),
                ("--shape", "tiny", "--vocab-size", "512", "--concurrency", "4", "--requests", "8", "--prompt-len", "16",
                 "--max-tokens", "8"), 150, "none on a GPU yet"),
    Measurement("gpt2_small_profile", "gpt2_small batch 32: device time per step (tools/profile_step.py)", "profile",
                ("--config=gpt2_small", "--steps=3", "--top=15", "--config.data.batch_size=32", "--config.train.grad_accum=1"),
                ("--config=gpt2_small:runlocal", "--steps=1", "--top=5", *TINY), 100,
                "68.7 ms device time per step"),
)
TOOLS = {"benchmark": "tools/benchmark.py", "lora": "tools/benchmark_lora.py", "profile": "tools/profile_step.py",
         "serve": "tools/benchmark_serve.py", "dpo": "tools/benchmark_dpo.py"}

# Run in a child: the versions, the device and lmtrain's registries, as one JSON line (a hang or a crash in
# JAX's start-up is then one failed probe, not a dead check).
PROBE = r"""
import json, platform, sys
out = {"python": platform.python_version(), "python_executable": sys.executable}
try:
    import jax, jaxlib
    out.update(jax=jax.__version__, jaxlib=jaxlib.__version__)
    dev = jax.devices()[0]
    out.update(platform=dev.platform, device_kind=dev.device_kind, device_count=jax.device_count())
except Exception as e:
    out["jax_error"] = f"{type(e).__name__}: {e}"
for name in ("flax", "optax"):
    try:
        out[name] = __import__(name).__version__
    except Exception as e:
        out[name] = f"unavailable ({type(e).__name__}: {e})"
try:
    from lmtrain.cli import COMMANDS
    from lmtrain.tasks import TASKS
    out.update(tasks=sorted(TASKS), commands=sorted(COMMANDS))
except Exception as e:
    out["lmtrain_error"] = f"{type(e).__name__}: {e}"
print("PROBE " + json.dumps(out))
"""


class Log:
    """Everything the children print, in one file (the device tool brings back at most 8 files), echoed."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        path.write_text("")

    def write(self, text: str, echo: bool = True) -> None:
        with self.path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        if echo:
            print(text.rstrip("\n"), flush=True)


def run_child(cmd: list[str], timeout_s: float, env: dict, log: Log) -> tuple[str, int | None, str]:
    """Run `cmd` in its own process group; ("ok" | "failed" | "timeout", return code, its output). A timeout
    ends the whole group (SIGTERM, then SIGKILL), so a hung step frees the accelerator for the next one."""
    log.write(f"$ {' '.join(cmd)}   (timeout {timeout_s:.0f} s)")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _end_group(proc)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # a process that left the group still holds the pipe: stop reading
            proc.stdout.close()
            out = "(output lost: a process outside the step's group held it open)"
        status = "timeout"
    log.write(out or "", echo=False)
    return status, proc.returncode, out or ""


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(x.strip() for x in text.strip().splitlines()[-lines:])[-400:]


# --- reading each tool's JSON -------------------------------------------------------------------------------

def read_benchmark(path: pathlib.Path) -> dict:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    row = next(r for r in reversed(rows) if r.get("impl") == "lmtrain")
    memory = next((v for k, v in row.items() if k.startswith("peak_mem_GiB")), None)
    memory_kind = next((k.split("(")[-1].rstrip(")") for k in row if k.startswith("peak_mem_GiB")), "")
    return {"metrics": {"tokens_per_s": row["tokens_per_s"], "mfu": row["mfu"], "step_ms": row["step_ms"],
                        "tflops_per_s": row["tflops_per_s"], "peak_memory_GiB": memory, "compile_s": row["compile_s"],
                        "params_M": row["params_M"]},
            "details": {"memory_kind": memory_kind, "peak_tflops": row.get("peak_tflops"), "final_loss": row["final_loss"]}}


def read_lora(path: pathlib.Path) -> dict:
    r = json.loads(path.read_text())[0]
    full, lora = r["variants"]["full"], r["variants"]["lora"]
    return {"metrics": {"full_tokens_per_s": full["tokens_per_s_median"], "lora_tokens_per_s": lora["tokens_per_s_median"],
                        "lora_speedup": r["lora_speedup_median"],
                        "full_state_GiB": full["params_and_optimizer_MiB"] / 1024,
                        "lora_state_GiB": lora["params_and_optimizer_MiB"] / 1024,
                        "full_step_peak_GiB": full["step_peak_MiB"] / 1024, "lora_step_peak_GiB": lora["step_peak_MiB"] / 1024,
                        "full_compile_s": full["compile_s"], "lora_compile_s": lora["compile_s"], "params_M": r["params_M"]},
            "details": {"rank": r["rank"], "targets": r["targets"], "tokens_per_step": r["tokens_per_step"],
                        "optimizer_state_drop_MiB": r["optimizer_state_drop_MiB"]}}


def read_profile(path: pathlib.Path) -> dict:
    r = json.loads(path.read_text())
    return {"metrics": {"device_ms_per_step": r["device_ms_per_step"], "wall_ms_per_step": r["wall_ms_per_step"],
                        "kernels": r["kernels"]},
            "details": {"top": [{"name": k["name"], "ms_per_step": k["ms_per_step"]} for k in r["top"][:5]]}}


def read_serve(path: pathlib.Path) -> dict:
    r = json.loads(path.read_text())
    return {"metrics": {"output_tokens_per_s": r["output_tokens_per_second"], "requests_per_s": r["requests_per_second"],
                        "ttft_p95_s": r["ttft_p95_s"], "e2e_p95_s": r["e2e_p95_s"], "start_s": r["start_s"]},
            "details": {"ok": r["ok"], "failed": r["failed"], "ttft_p50_s": r["ttft_p50_s"], "e2e_p50_s": r["e2e_p50_s"]}}


def read_dpo(path: pathlib.Path) -> dict:
    r = json.loads(path.read_text())
    return {"metrics": {"sft_ms_per_step": r["sft_ms_per_step"], "dpo_ms_per_step": r["dpo_ms_per_step"],
                        "dpo_over_sft": r["dpo_over_sft"], "dpo_lora_ms_per_step": r["dpo_lora_ms_per_step"],
                        "dpo_lora_over_sft": r["dpo_lora_over_sft"]},
            "details": {"batch_size": r["batch_size"], "seq_len": r["seq_len"], "reference": r["reference"]}}


READERS = {"benchmark": read_benchmark, "lora": read_lora, "profile": read_profile, "serve": read_serve,
           "dpo": read_dpo}


def bad_metrics(metrics: dict) -> list[str]:
    """Names of metrics that are not finite positive numbers (a None MFU: the device's peak is unknown)."""
    return [k for k, v in metrics.items()
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0]


# --- the steps ----------------------------------------------------------------------------------------------

def measure(m: Measurement, args, env: dict, work: pathlib.Path, timeout_s: float, log: Log) -> dict:
    """Run one tool and read its JSON: {"status", "command", "metrics", ...}."""
    result_path = work / f"{m.name}.json"
    result_path.unlink(missing_ok=True)
    shown = [TOOLS[m.tool], *(m.dry_args if args.dry_run else m.args)]
    if args.dry_run and m.tool == "benchmark":
        shown.append(f"--peak-tflops={DRY_PEAK_TFLOPS}")
    t0 = time.monotonic()
    status, rc, out = run_child([args.python, *shown, "--json", str(result_path)], timeout_s, env, log)
    record = {"status": status, "command": " ".join(["python", *shown]), "elapsed_s": round(time.monotonic() - t0, 1)}
    if status == "timeout":
        return {**record, "error": f"timed out after {timeout_s:.0f} s; last output: {_tail(out)}"}
    if status == "failed":
        return {**record, "error": f"exit {rc}: {_tail(out)}"}
    try:
        record.update(READERS[m.tool](result_path))
    except (OSError, ValueError, KeyError, IndexError, StopIteration) as e:
        return {**record, "status": "failed", "error": f"no readable result in {result_path.name}: {type(e).__name__}: {e}"}
    bad = bad_metrics(record["metrics"])
    if bad:
        record.update(status="failed", error=f"not finite positive numbers: {', '.join(bad)}")
    return record


def feature_status(m: Measurement, probe: dict) -> dict:
    """A feature this version may lack: detected from lmtrain's registries, never assumed."""
    registry, key = m.feature
    if registry not in probe:
        return {"status": "failed", "error": f"could not read lmtrain's {registry}: {probe.get('lmtrain_error', 'probe failed')}"}
    if key not in probe[registry]:
        return {"status": "not_available", "error": f"not available in this version (no '{key}' in lmtrain's {registry})"}
    return {"status": "failed", "error": f"'{key}' exists in lmtrain's {registry} now, but tools/device_check.py has no "
                                        f"measurement for it yet: add one"}


def probe_environment(args, env: dict, log: Log) -> dict:
    status, _, out = run_child([args.python, "-c", PROBE], 120, env, log)
    line = next((x for x in out.splitlines() if x.startswith("PROBE ")), None)
    probe = json.loads(line[len("PROBE "):]) if line else {"probe_error": f"{status}: {_tail(out)}"}
    probe["nvidia_smi"] = nvidia_smi()
    probe["git_commit"] = _git_commit()
    return probe


def nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return "not found"
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed: {e}"
    driver_line = next((x.strip(" |") for x in banner.stdout.splitlines() if "Driver Version" in x), "")
    return "; ".join(x for x in (query.stdout.strip(), driver_line) if x) or f"failed: {query.stderr.strip()}"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")) if out.returncode == 0 else "unknown"


def installed_cuda_jax(python: str) -> list[str]:
    """The jax-cuda* distributions (CUDA plugins) installed for `python`."""
    code = ("import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] or '' for d in m.distributions()))")
    try:
        names = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted({n for n in names if n.lower().startswith("jax-cuda")})


def package_index(python: str) -> str:
    """The index pip would use: PIP_INDEX_URL, else pip's configured global.index-url, else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        listed = None
    for line in listed.stdout.splitlines() if listed else []:
        key, _, value = line.partition("=")
        if key.endswith("index-url") and not key.endswith("extra-index-url"):
            return value.strip("'\"")
    return "https://pypi.org/simple"


def reachable(url: str, timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens: on a machine with no network pip would spend minutes
    retrying before it fails, out of the measurements' budget."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return True  # a local index (file://): let pip try it
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout_s).close()
        return True
    except OSError:
        return False


def install(args, env: dict, deadline: float, log: Log) -> dict:
    """pip install the project with its gpu extra; where a CUDA JAX is already installed, without the extra (it
    would add a second CUDA plugin beside the one there). With no index reachable, wheels carried in --wheels are
    installed instead (lmtrain's pure-Python dependencies the machine lacks)."""
    cuda_jax = installed_cuda_jax(args.python)
    target = "." if cuda_jax else ".[gpu]"
    cmd = [args.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--retries", "1", "--timeout", "15",
           "-e", target]
    index = package_index(args.python)
    record = {"command": " ".join(cmd[1:]), "kept": cuda_jax, "index": index}
    if reachable(index):
        status, _, out = run_child(cmd, max(1.0, min(args.install_timeout_s, deadline - time.monotonic())), env, log)
        record["status"] = status
        if status != "ok":
            record["error"] = _tail(out)
    else:
        status = record["status"] = "skipped"
        record["error"] = f"no connection to {index}"
        log.write(f"install: skipped, no connection to {index}")
    wheels = sorted(pathlib.Path(args.wheels).glob("*.whl")) if args.wheels else []
    if status != "ok" and wheels:
        site = pathlib.Path(tempfile.mkdtemp(prefix="device_check_site_"))
        w_status, _, w_out = run_child([args.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                        "--no-compile", "--target", str(site), *map(str, wheels)], 120, env, log)
        record["wheels"] = {"status": w_status, "files": [w.name for w in wheels]}
        if w_status == "ok":
            paths = [str(REPO), str(site), *env.get("PYTHONPATH", "").split(os.pathsep)]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
        else:
            record["wheels"]["error"] = _tail(w_out)
    return record


# --- output -------------------------------------------------------------------------------------------------

def _fmt(v, spec: str = ",.0f", suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def table_row(name: str, r: dict) -> str:
    m, status = r.get("metrics", {}), r["status"]
    if status != "ok":
        cells = [name, status.replace("_", " "), "", "", "", "", "", r.get("earlier", ""), r.get("error", "")]
    elif "lora_speedup" in m:
        cells = [name, "ok", f"full {_fmt(m['full_tokens_per_s'])} / LoRA {_fmt(m['lora_tokens_per_s'])} "
                 f"({m['lora_speedup']:.2f}x)", "", "",
                 f"params + optimizer state {_size(m['full_state_GiB'])} -> {_size(m['lora_state_GiB'])}; step peak (XLA) "
                 f"{_size(m['full_step_peak_GiB'])} -> {_size(m['lora_step_peak_GiB'])}",
                 f"{m['full_compile_s']:.0f} + {m['lora_compile_s']:.0f} s", r.get("earlier", ""), r["command"]]
    elif "output_tokens_per_s" in m:
        cells = [name, "ok", f"{_fmt(m['output_tokens_per_s'])} output", "",
                 f"p95 first token {m['ttft_p95_s'] * 1000:,.0f} ms, p95 end-to-end {m['e2e_p95_s'] * 1000:,.0f} ms",
                 "", f"{m['start_s']:.0f} s to serve", r.get("earlier", ""), r["command"]]
    elif "dpo_over_sft" in m:
        cells = [name, "ok", "", "", f"SFT {m['sft_ms_per_step']:,.1f} ms, DPO {m['dpo_ms_per_step']:,.1f} ms "
                 f"({m['dpo_over_sft']:.2f}x), DPO LoRA {m['dpo_lora_ms_per_step']:,.1f} ms ({m['dpo_lora_over_sft']:.2f}x)",
                 "", "", r.get("earlier", ""), r["command"]]
    elif "device_ms_per_step" in m:
        top = r["details"]["top"][0] if r["details"]["top"] else {"name": "", "ms_per_step": 0}
        cells = [name, "ok", "", "", f"{m['device_ms_per_step']:.1f} ms device, {m['wall_ms_per_step']:.1f} ms wall",
                 "", "", r.get("earlier", ""), f"{r['command']}; top kernel {top['name'][:40]} {top['ms_per_step']:.1f} ms"]
    else:
        cells = [name, "ok", _fmt(m["tokens_per_s"]), f"{m['mfu']:.1%}", f"{m['step_ms']:,.1f} ms",
                 f"{_size(m['peak_memory_GiB'])} ({r['details']['memory_kind']})", f"{m['compile_s']:.0f} s",
                 r.get("earlier", ""), r["command"]]
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def environment_lines(e: dict) -> list[str]:
    return [f"Device: {e.get('device_count', '?')} x {e.get('device_kind', '?')} ({e.get('platform', '?')}); "
            f"nvidia-smi: {e.get('nvidia_smi', '?')}.",
            f"Python {e.get('python', '?')}, jax {e.get('jax', '?')}, jaxlib {e.get('jaxlib', '?')}, "
            f"flax {e.get('flax', '?')}, optax {e.get('optax', '?')}; lmtrain {e.get('git_commit', '?')}."]


def markdown(report: dict) -> str:
    lines = [f"Device check ({'dry run, CPU, tiny shapes: not a benchmark' if report['dry_run'] else 'accelerator'}), "
             f"{report['started']}, {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
             *environment_lines(report["environment"]), "",
             "| measurement | status | tokens/s | MFU | step | memory | compile | earlier (BENCHMARKS.md, H100) | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [table_row(name, r) for name, r in report["measurements"].items()]
    return "\n".join(lines) + "\n"


def write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(report: dict, out: pathlib.Path) -> None:
    write_atomic(out / "device_check.json", json.dumps(report, indent=1) + "\n")
    write_atomic(out / "device_check.md", markdown(report))


# --- main ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="where device_check.json, .md and .log go (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DEVICE_CHECK_DRY_RUN") == "1",
                   help="CPU, tiny shapes, no install (also DEVICE_CHECK_DRY_RUN=1)")
    p.add_argument("--skip-install", action="store_true", help="use the installed packages as they are")
    p.add_argument("--only", default="", help="comma-separated measurement names (default: all); the rest are 'skipped'")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time, install included (default 480)")
    p.add_argument("--install-timeout-s", type=float, default=150.0)
    p.add_argument("--wheels", default=str(REPO / ".whl"),
                   help="wheels to install offline if pip cannot reach an index (default: .whl in the repository)")
    p.add_argument("--python", default=sys.executable, help="the interpreter the measurements run under")
    args = p.parse_args(argv)
    out = args.out or os.environ.get("OUT", "")
    if not out:
        p.exit(2, "device_check: error: no output directory: give --out DIR or set OUT.\n")
    args.out = pathlib.Path(out)
    names = {m.name for m in MEASUREMENTS}
    args.only = [x for x in args.only.split(",") if x]
    unknown = sorted(set(args.only) - names)
    if unknown:
        p.exit(2, f"device_check: error: --only: unknown measurement {', '.join(unknown)}; "
                  f"choose from {', '.join(sorted(names))}.\n")
    return args


def child_env(dry_run: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = [str(REPO), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    if dry_run:  # one CPU device, like the one-GPU machine (not the 8 fake devices a test session may ask for)
        env["JAX_PLATFORMS"] = "cpu"
        flags = env.get("XLA_FLAGS", "").split()
        env["XLA_FLAGS"] = " ".join(f for f in flags if not f.startswith("--xla_force_host_platform_device_count"))
    return env


def run(args, measurements: tuple[Measurement, ...] | None = None) -> dict:
    measurements = MEASUREMENTS if measurements is None else measurements
    start = time.monotonic()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="device_check_"))
    log = Log(args.out / "device_check.log")
    env = child_env(args.dry_run)
    report = {"dry_run": args.dry_run, "complete": False, "started": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "budget_s": args.budget_s, "elapsed_s": 0.0, "environment": {}, "measurements": {}}
    if args.dry_run or args.skip_install:
        report["install"] = {"status": "skipped", "reason": "--dry-run" if args.dry_run else "--skip-install"}
    else:
        report["install"] = install(args, env, deadline, log)
    report["environment"] = probe_environment(args, env, log)
    log.write("\n".join(environment_lines(report["environment"])))
    log.write("environment: " + json.dumps(report["environment"]), echo=False)
    write_report(report, args.out)
    if "lmtrain_error" in report["environment"]:
        report["hint"] = ("lmtrain does not import here: install its dependencies (pip install -e .), or carry the missing "
                          "wheels in .whl (BENCHMARKS.md, 'Device check')")
        log.write(f"hint: {report['hint']}")
    platform = report["environment"].get("platform")
    no_accelerator = not args.dry_run and platform not in ACCELERATORS
    for m in measurements:
        remaining = deadline - time.monotonic()
        base = {"title": m.title, "earlier": m.earlier}
        if args.only and m.name not in args.only:
            result = {"status": "skipped", "error": "not selected (--only)"}
        elif m.tool == "feature":
            result = feature_status(m, report["environment"])
        elif no_accelerator:  # the GPU shapes on a CPU would only run into their timeouts
            result = {"status": "failed", "error": f"no accelerator: JAX's first device is {platform or 'unknown'} "
                                                   f"({report['environment'].get('jax_error', 'see device_check.log')})"}
        elif remaining < MIN_STEP_S:
            result = {"status": "skipped", "error": f"budget spent ({remaining:.0f} s left of {args.budget_s:.0f})"}
        else:
            log.write(f"== {m.name}: {m.title}")
            result = measure(m, args, env, work, min(m.timeout_s, remaining), log)
        report["measurements"][m.name] = {**base, **result}
        log.write(f"-> {m.name}: {result['status']} {json.dumps(result.get('metrics', result.get('error', '')))}")
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        write_report(report, args.out)  # after each step: a cut-off run still leaves what it measured
    report["complete"] = True
    write_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print("\n" + markdown(report), flush=True)
    print(f"wrote {args.out / 'device_check.json'}, device_check.md and device_check.log")
    failed = [n for n, r in report["measurements"].items()
              if r["status"] in ("failed", "timeout") or r.get("error", "").startswith("budget spent")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
