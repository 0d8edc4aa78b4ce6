"""What a run logs (issue 7, item 6 and the cut-off metrics line): tokens_seen and epoch belong to the
step they are logged at, and after a kill and a resume every step is in metrics.jsonl and TensorBoard once."""

from __future__ import annotations

import json
import pathlib
import signal
import time

import numpy as np
import pytest

from lmtrain.config import to_json
from lmtrain.train import metrics as metrics_lib
from lmtrain.train.trainer import train
from tests.core_fixtures import cli, run_config

pytestmark = pytest.mark.usefixtures("compile_cache")


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _loss_steps(workdir) -> list[int]:
    return [r["step"] for r in _records(workdir) if "loss" in r]


def _tensorboard_steps(workdir, tag: str = "loss") -> list[int]:
    """The steps TensorBoard shows for `tag` (its reader applies the purge a resumed writer asks for)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(pathlib.Path(workdir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_plot_survives_a_cut_off_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 2, "val_loss": 4.5}\n{"step": 3, "lo')
    assert [r["step"] for r in metrics_lib.read_metrics(path)] == [1, 2, 2]
    png = metrics_lib.plot_loss_curve(path, tmp_path / "loss_curve.png")
    assert png and (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokens_per_s_counts_real_tokens_and_slots_per_s_the_padding_too():
    """Issue 25: the logged tok/s was padded slots; on short rows it showed 2.3x what trained."""
    segment_ids = np.zeros((4, 16), np.int32)
    for row, n in enumerate((16, 8, 4, 4)):  # 32 of 64 slots are real tokens
        segment_ids[row, :n] = 1
    real, slots, row_len = metrics_lib.batch_tokens({"segment_ids": segment_ids, "inputs": segment_ids}, data_count=2)
    assert (real, slots, row_len) == (64, 128, 16)  # two data slices, each with a batch like this one
    rates = metrics_lib.throughput(real, slots, flops=real * 1000.0, seconds=2.0, peak_flops=1e5, n_devices=4)
    assert rates["slots_per_s"] == 64.0 and rates["tokens_per_s"] == 32.0 < rates["slots_per_s"]
    assert rates["tokens_per_s"] == pytest.approx(rates["slots_per_s"] * rates["real_fraction"])
    assert rates["mfu"] == pytest.approx(64 * 1000.0 / 2.0 / (1e5 * 4))  # the FLOPs of real tokens only
    assert "mfu" not in metrics_lib.throughput(real, slots, 1.0, 1.0, None, 1)  # unknown peak (CPU): no MFU


@pytest.mark.slow
def test_tokens_seen_and_epoch_belong_to_their_step(tmp_path, tokenizer_512):
    """A corpus of a few batches per epoch, so that the run crosses two epoch boundaries."""
    from lmtrain.data.pipeline import make_data

    overrides = {"data.val_fraction": 0.5, "train.eval_every": 0, "checkpoint.every": 100}
    probe = run_config(tokenizer_512, 1, **overrides)
    rows = make_data(probe, tmp_path / "probe").train.n_rows
    batch = max(8, rows // 3 // 8 * 8)  # about three batches per epoch
    cfg = run_config(tokenizer_512, 10, **{**overrides, "data.batch_size": batch})
    result = train(cfg, tmp_path / "run")
    assert result.step == 10
    per_epoch = rows // batch
    assert 1 <= per_epoch < 5, (rows, batch)
    logged = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 11))
    for r in logged:
        n = r["step"]
        assert r["tokens_seen"] == n * batch * cfg.data.seq_len, r
        assert r["epoch"] == n // per_epoch, f"step {n}: epoch {r['epoch']}, but {n} batches of {per_epoch} per epoch"


@pytest.mark.slow
def test_after_sigkill_and_resume_every_step_is_logged_once_and_the_plot_is_drawn(tmp_path, tokenizer_512, compile_cache_dir):
    workdir = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(to_json(run_config(tokenizer_512, 100000, **{
        "logging.tensorboard": True, "train.eval_every": 0, "checkpoint.every": 3, "checkpoint.keep": 2})))
    proc = cli(["train", f"--config={config}", f"--workdir={workdir}", "--no-progress"], compile_cache_dir)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(_loss_steps(workdir)) >= 8:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = max(_loss_steps(workdir))
    resumed_from = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert resumed_from < killed_at, "the kill should leave logged steps after the last checkpoint"

    with open(metrics, "a") as f:  # a kill in the middle of a write leaves a cut-off line
        f.write(json.dumps({"step": killed_at + 1, "grad_norm": 1.2})[:-8])

    end = killed_at + 2
    resumed = cli(["train", f"--config={config}", f"--workdir={workdir}", "--no-progress",
                   f"--config.train.steps={end}", "--config.logging.loss_curve_png=true"], compile_cache_dir)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"from step {resumed_from}" in out and "Traceback" not in out, out
    assert _loss_steps(workdir) == list(range(1, end + 1))
    assert all(line.startswith("{") and line.endswith("}") for line in metrics.read_text().splitlines())
    assert _tensorboard_steps(workdir) == list(range(1, end + 1))
    assert (workdir / "loss_curve.png").stat().st_size > 1000
