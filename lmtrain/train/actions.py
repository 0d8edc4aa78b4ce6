"""The training loop's periodic actions, in the manner of clu and big_vision: small objects that fire
every N steps (and at the end). The loop itself only steps and calls them, in order:

    LogMetrics   reads step N-1's metrics while step N runs; stops loudly on a non-finite loss or update
    Evaluate     the task's validation metrics; early stopping and the caller's `on_eval` hook
    Checkpoint   an asynchronous save (never of a non-finite state)

The stop check (SIGTERM, SIGINT, --stop-at-step, early stopping) is `Run.should_stop`.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.errors import ConfigError
from lmtrain.train import metrics as metrics_lib


class TrainingDiverged(RuntimeError):
    """A non-finite loss or update; the message names the step, the evidence and the last good checkpoint."""


# ---------------------------------------------------------------------------------------------- signals


class StopSignal:
    """Remembers SIGTERM/SIGINT (a TPU preemption, Ctrl-C) so that the loop checkpoints at a step
    boundary and exits 0. Installed first thing, kept until the final save is done: a second signal
    during that save is acknowledged, not fatal."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        self.finishing = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
            for signum in getattr(self._previous[sig], "received", ()):  # held by lmtrain.cli while JAX loaded
                self.signal_name = self.signal_name or signal.Signals(signum).name

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None or self.finishing:
            print(f"lmtrain: {name} again: already stopping, the checkpoint is being written; it will exit "
                  "as soon as the save is complete.", file=sys.stderr, flush=True)
        self.signal_name = self.signal_name or name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class HostAgreement:
    """Whether any host has seen a stop signal, agreed by all hosts without stalling the step.

    Every `every` steps each host dispatches a tiny all-reduce of its local flag and reads the result
    of the previous one, which finished long ago: all hosts take the same decision at the same step,
    and the host never waits for the device (one check's latency is `every` steps). JAX's own
    preemption service is off (lmtrain.parallel.mesh), so SIGTERM reaches this Python handler.
    """

    def __init__(self, mesh, every: int):
        self.every = every
        self.multi_host = jax.process_count() > 1
        self._pending = None
        if self.multi_host:
            devices = mesh.devices.reshape(-1)
            flat_mesh = jax.sharding.Mesh(devices, ("all",))
            self._sharding = NamedSharding(flat_mesh, PartitionSpec("all"))
            self._n_local = len([d for d in devices if d.process_index == jax.process_index()])
            self._any = jax.jit(jnp.any, out_shardings=NamedSharding(flat_mesh, PartitionSpec()))

    def check(self, step: int, local: bool) -> bool:
        if not self.multi_host:
            return local
        if step % self.every:
            return False
        previous, self._pending = self._pending, self._any(
            jax.make_array_from_process_local_data(self._sharding, np.full(self._n_local, local)))
        return bool(previous) if previous is not None else False

    def final(self, local: bool) -> bool:
        """A blocking check, for the moments when the loop waits anyway (before the final save)."""
        if not self.multi_host:
            return local
        return bool(self._any(jax.make_array_from_process_local_data(self._sharding, np.full(self._n_local, local))))


# ---------------------------------------------------------------------------------------------- actions


def every(n: int, step: int, total: int) -> bool:
    return bool(n) and (step % n == 0 or step == total)


@dataclasses.dataclass
class LogMetrics:
    """Reads each step's metrics one step late, checks them, and logs every `log_every` steps."""

    log_every: int
    total: int
    peak_flops: float | None
    schedule: Callable
    writer: metrics_lib.MetricsWriter
    progress: metrics_lib.ProgressBar
    pending: list = dataclasses.field(default_factory=list)
    last_loss: float | None = None
    _t_last: float = dataclasses.field(default_factory=time.perf_counter)
    _since: list = dataclasses.field(default_factory=lambda: [0, 0, 0.0])  # real tokens, slots, FLOPs

    def push(self, step: int, metrics, tokens_seen: int, epoch: int, counts: tuple[int, int, float]) -> None:
        """Queue a step's metrics with its (real tokens, padded slots, FLOPs of the real tokens)."""
        self.pending.append((step, metrics, tokens_seen, epoch, counts))

    def drain(self, run, keep_last: bool) -> None:
        """Check and log every pending step (all but the newest when `keep_last`)."""
        while len(self.pending) > (1 if keep_last else 0):
            self._one(run, *self.pending.pop(0))

    def _one(self, run, step: int, metrics, tokens_seen: int, epoch: int, counts: tuple[int, int, float]) -> None:
        m = jax.device_get(metrics)
        loss, finite_update = float(m["loss"]), bool(m["update_finite"])
        if not math.isfinite(loss) or not finite_update:
            raise TrainingDiverged(divergence_message(step, loss, finite_update, float(m["grad_norm"]),
                                                      self.last_loss, run.last_saved))
        self.last_loss = loss
        self._since = [a + b for a, b in zip(self._since, counts)]
        if not every(self.log_every, step, self.total):
            return
        now = time.perf_counter()
        record = {k: float(v) for k, v in m.items() if k not in ("update_finite", "weight")}
        record.update(lr=float(self.schedule(step - 1)), tokens_seen=tokens_seen, epoch=epoch)
        record.update(metrics_lib.throughput(*self._since, now - self._t_last, self.peak_flops, jax.device_count()))
        self.writer.write(step, record)
        self.progress.update(step, record["loss"], record["tokens_per_s"], record.get("mfu"), record["real_fraction"])
        self._t_last, self._since = now, [0, 0, 0.0]


def divergence_message(step: int, loss: float, finite_update: bool, grad_norm: float, previous_loss: float | None,
                       last_saved: int | None) -> str:
    saved = (f"The last good checkpoint is step {last_saved}; resuming from it repeats this step unless the "
             "cause is changed." if last_saved else "No checkpoint was saved before it.")
    if not math.isfinite(loss):
        head = f"loss is {loss} at step {step}, computed from finite parameters (before this step's update)."
        if previous_loss is None:
            cause = ("It is the first step of this run, so the cause is the data or the numerics, not the learning "
                     "rate: check that token ids are below model.vocab_size and positions below model.max_seq_len, "
                     "and try model.dtype=float32.")
        else:
            cause = (f"The previous step's loss was {previous_loss:.4g}. A sudden non-finite loss points at the data "
                     "(a bad batch) or overflow in model.dtype; a loss that had been climbing points at "
                     "optimizer.lr (lower it, raise optimizer.warmup_steps, or set train.z_loss).")
        return f"{head} {cause} {saved}"
    return (f"the update at step {step} made the parameters non-finite (loss {loss:.4g}, gradient norm "
            f"{grad_norm:.4g}): the step was too large. Lower optimizer.lr, raise optimizer.warmup_steps, or set "
            f"optimizer.clip_norm. Nothing non-finite was saved. {saved}")


@dataclasses.dataclass
class EarlyStopping:
    """Stops after `patience` evaluations without an improvement of at least `min_delta`.
    Its state (best value and step, evaluations since) is saved in every checkpoint."""

    metric: str
    mode: str
    patience: int
    min_delta: float
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it is the best so far."""
        improved = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta)
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step, self.bad_evals = state.get("best"), state.get("best_step"), state.get("bad_evals", 0)


@dataclasses.dataclass
class Evaluate:
    every: int
    total: int
    max_batches: int
    early_stopping: EarlyStopping
    on_eval: Callable[[int, dict], bool] | None = None

    def __call__(self, run) -> dict:
        sums = None
        for batch in run.data.eval_batches(self.max_batches):
            out = run.eval_fn(run.params(), run.global_batch(batch))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)  # summed on device, read once
        if sums is None:
            return {}
        sums = jax.tree.map(np.asarray, jax.device_get(sums))
        run.last_eval_sums = sums
        metrics = run.task.eval_metrics(sums)
        if not metrics:
            return {}
        metrics.update(run.task.extra_eval(run.model_def, run.params(), run.data))
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        arrays = {k: np.asarray(v).tolist() for k, v in metrics.items() if np.ndim(v) > 0}
        run.writer.write(run.step, scalars, arrays)
        # Per-class scores ('val_f1/CLASS') go to the logs; the console line keeps the headline metrics.
        run.progress.write(f"step {run.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items() if "/" not in k))
        es = self.early_stopping
        if es.metric not in scalars:
            raise ConfigError(f"train.early_stopping.metric='{es.metric}' is not among this task's evaluation "
                              f"metrics ({', '.join(scalars)}).")
        es.update(run.step, scalars[es.metric])
        if es.should_stop:
            run.stop_reason = (f"early stopping: {es.metric} has not improved by {es.min_delta} for {es.patience} "
                               f"evaluations (best {es.best:.4g} at step {es.best_step})")
        if self.on_eval is not None and self.on_eval(run.step, dict(scalars)):
            run.stop_reason = run.stop_reason or "on_eval (pruned)"
        return scalars


@dataclasses.dataclass
class Checkpoint:
    every: int
    total: int

    def __call__(self, run, eval_metrics: dict | None) -> None:
        run.writer.flush()  # what was logged up to this step is on disk: after a kill, a resume re-logs only later steps
        run.save(eval_metrics)
