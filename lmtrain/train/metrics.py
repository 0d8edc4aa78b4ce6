"""Where training metrics go: a console progress bar, TensorBoard, WORKDIR/metrics.jsonl, a loss-curve PNG,
and the model-FLOPs utilisation (MFU) against the device's peak."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax

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


def matmul_params(model_def) -> int:
    """Parameters that take part in a matmul per token: all but the position table and an untied lookup table."""
    total = model_def.num_params()
    shapes = model_def.shapes
    if "pos_embed" in shapes:
        total -= math.prod(shapes["pos_embed"].shape)
    if shapes.get("head", {}).get("w") is not None:  # untied: the embedding is only a lookup
        total -= math.prod(shapes["embed"].shape)
    return total


class MetricsWriter:
    """Writes metrics to metrics.jsonl and TensorBoard (only on process 0)."""

    def __init__(self, workdir: pathlib.Path, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class ProgressBar:
    """tqdm bar with step, loss, tokens/s and ETA; plain periodic lines when stdout is not a terminal."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout,
                            mininterval=1.0 if sys.stdout.isatty() else 30.0)

    def update(self, n: int, loss: float, tokens_per_s: float, mfu: float | None) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_loss_curve(metrics_path: pathlib.Path, out_path: pathlib.Path) -> pathlib.Path | None:
    """Train and validation loss against step, as a PNG."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = {}, {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
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
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
