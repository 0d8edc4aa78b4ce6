"""Where training metrics go: a console progress bar, TensorBoard, WORKDIR/metrics.jsonl, a loss-curve PNG,
and the model-FLOPs utilisation (MFU) against the device's peak."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import jax
import numpy as np

from lmtrain.paths import append_text, as_path, copy_tree, is_remote
from lmtrain.storage.atomic import atomic_write_text

# Dense bf16 peak FLOP/s per device (one chip for TPU, one GPU).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
}


def device_peak_flops(device=None) -> float | None:
    """Peak bf16 FLOP/s of `device` (the first device by default), or None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_FLOPS.items():  # ordered: more specific names first
        if name in kind:
            return peak
    return None


def flops_per_token(model_cfg, seq_len: int, n_params_matmul: int) -> float:
    """Training FLOPs per token: 6N for the weight matmuls plus 12 * layers * seq_len * attention width."""
    attn_width = model_cfg.n_heads * (model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads)
    return 6.0 * n_params_matmul + 12.0 * model_cfg.n_layers * seq_len * attn_width


def batch_tokens(batch: dict, data_count: int = 1) -> tuple[int, int, int]:
    """(real tokens, padded slots, row length) of the global batch whose host part is `batch`: real tokens
    are the non-padding ones (segment id > 0), slots every position the step computes. Hosts that read
    other rows hold batches of the same shape and, summed over a window of steps, the same mix."""
    segment_ids = np.asarray(batch["segment_ids"])
    return (int(np.count_nonzero(segment_ids)) * data_count, segment_ids.size * data_count,
            int(segment_ids.shape[-1]))


def throughput(real_tokens: int, slots: int, flops: float, seconds: float, peak_flops: float | None,
               n_devices: int) -> dict[str, float]:
    """Rates over a stretch of steps: tokens_per_s counts real (non-padding) tokens, slots_per_s every padded
    position computed, and the MFU counts the FLOPs of the real tokens only (padding is no useful work)."""
    seconds = max(seconds, 1e-9)
    rates = {"tokens_per_s": real_tokens / seconds, "slots_per_s": slots / seconds,
             "real_fraction": real_tokens / slots if slots else 0.0}
    if peak_flops:
        rates["mfu"] = flops / seconds / (peak_flops * n_devices)
    return rates


def matmul_params(model_def) -> int:
    """Parameters that take part in a matmul per token: all but the position table and an untied lookup table."""
    total = model_def.num_params()
    shapes = model_def.shapes
    if "pos_embed" in shapes:
        total -= math.prod(shapes["pos_embed"].shape)
    head = shapes.get("head")
    if hasattr(head, "shape") or (isinstance(head, dict) and head.get("w") is not None):  # untied: the embedding is only a lookup
        total -= math.prod(shapes["embed"].shape)
    return total


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a cut-off or garbled line (a kill mid-write) is skipped."""
    path = as_path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records


class MetricsWriter:
    """Writes metrics to WORKDIR/metrics.jsonl and TensorBoard (only on process 0).

    On resume from step S, records after S (logged by the run that was killed, and about to be logged
    again) are dropped from metrics.jsonl and TensorBoard purges its events after S, so every step is
    logged once. In cloud storage, where files cannot be appended to, records are buffered and the file
    rewritten at most every `remote_flush_seconds`; TensorBoard events are written locally and copied.
    """

    def __init__(self, workdir, tensorboard: bool, enabled: bool = True, resume_step: int = 0,
                 remote_flush_seconds: float = 30.0):
        self.enabled = enabled
        self.workdir = as_path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.remote = is_remote(self.workdir)
        self.tb = None
        self._buffer: list[str] = []
        self._flush_every, self._last_flush = remote_flush_seconds, time.monotonic()
        self._tb_local = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        if self.path.exists():
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter

            logdir = self.workdir / "tensorboard"
            if self.remote:
                import tempfile

                self._tb_local = tempfile.mkdtemp(prefix="lmtrain-tb-")
                logdir = self._tb_local
            self.tb = SummaryWriter(str(logdir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict, arrays: dict | None = None) -> None:
        """Scalars go to metrics.jsonl and TensorBoard; `arrays` (a confusion matrix: nested lists) to metrics.jsonl."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, **(arrays or {})}
        self._buffer.append(json.dumps(record) + "\n")
        if not self.remote or time.monotonic() - self._last_flush > self._flush_every:
            self._flush_records()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), int(step))

    def _flush_records(self) -> None:
        if self._buffer:
            append_text(self.path, "".join(self._buffer))
            self._buffer = []
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        """Put everything logged so far on disk, TensorBoard events included (they are otherwise queued
        for up to two minutes, and a killed run would lose them while its checkpoint keeps the steps)."""
        if not self.enabled:
            return
        self._flush_records()
        if self.tb is not None:
            self.tb.flush()
            if self._tb_local is not None:
                copy_tree(self._tb_local, self.workdir / "tensorboard")

    def close(self) -> None:
        if not self.enabled:
            return
        self._flush_records()
        if self.tb is not None:
            self.tb.close()
            if self._tb_local is not None:
                copy_tree(self._tb_local, self.workdir / "tensorboard")


class ProgressBar:
    """A tqdm bar with step, loss, tokens/s, MFU and ETA; without the bar (--no-progress, or stdout not a
    terminal), one plain line per logged step with the same figures."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool = True, log_every: int = 1):
        self.bar = None
        self.enabled = enabled
        self.total, self.start_step, self._t0 = total, initial, time.perf_counter()
        if enabled and bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout,
                            mininterval=1.0)

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None, real_fraction: float = 1.0) -> None:
        if not self.enabled:
            return
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}  # real tokens, not padding
        if real_fraction < 0.995:
            post["pad"] = f"{100 * (1 - real_fraction):.0f}%"
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        elapsed = time.perf_counter() - self._t0
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.total - step)
        print(f"step {step}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in post.items())
              + f"  eta {_duration(eta)}", flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plot_loss_curve(metrics_path: pathlib.Path, out_path: pathlib.Path) -> pathlib.Path | None:
    """Train and validation loss against step, as a PNG."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = {}, {}
    for rec in records:
        if "loss" in rec:
            train[rec["step"]] = rec["loss"]
        if "val_loss" in rec:
            val[rec["step"]] = rec["val_loss"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss", lw=1.2)
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"lmtrain: {out_path.parent.name}")
    fig.tight_layout()
    import io

    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    as_path(out_path).write_bytes(png.getvalue())
    return out_path
