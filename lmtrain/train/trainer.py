"""`lmtrain train`: build the run from a config, then loop: step, then the periodic actions.

    lmtrain train --config=tiny --workdir=workdir/tiny [--config.optimizer.lr=1e-3 ...] [--stop-at-step=N]

The loop dispatches step N and then reads step N-1's metrics, so the device never waits on the
host. SIGTERM/SIGINT (a TPU preemption) saves a checkpoint and exits 0; the same command resumes.
The trainer knows no task: what differs between tasks is asked of the task (lmtrain.tasks.base.Task).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain import config as config_lib
from lmtrain.data.packing import check_batch
from lmtrain.data.shards import training_tokenizer_dir
from lmtrain.locking import DirectoryInUse, DirLock
from lmtrain.model import ModelDef, build_model_def
from lmtrain.model.decode import SamplingConfig, generate
from lmtrain.parallel.mesh import make_mesh, maybe_initialize_distributed
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec
from lmtrain.param_rules import ParamPlan, param_paths
from lmtrain.paths import as_path, is_remote
from lmtrain.storage.atomic import atomic_write_text
from lmtrain.tasks import make_task
from lmtrain.train import metrics as metrics_lib
from lmtrain.train.actions import (
    Checkpoint,
    EarlyStopping,
    Evaluate,
    HostAgreement,
    LogMetrics,
    StopSignal,
    TrainingDiverged,
    every,
)
from lmtrain.train.checkpoint import Checkpointer, CheckpointError
from lmtrain.train.optimizer import make_optimizer
from lmtrain.train.state import abstract_with_shardings, init_params_fn, init_state_fn, state_shardings
from lmtrain.train.step import make_train_step
from lmtrain.trees import flat_paths, nest_paths
from lmtrain.workdir import overlay_init_from, start_params

DONE = "done.json"

# Settings a resumed run may change: how it is observed, saved and laid out, not what it computes.
RESUMABLE_CHANGES = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.sample_tokens",
    "train.sample_prompt", "train.preemption_check_every", "train.early_stopping.patience",
    "train.early_stopping.min_delta", "train.init_from", "train.init_from_which", "checkpoint.", "logging.", "mesh.",
    "data.verify_shards", "data.shards_dir", "data.tokenizer_dir", "model.attention_impl", "model.remat",
    "model.scan_layers",
)


@dataclasses.dataclass
class TrainResult:
    step: int
    stopped_by: str | None
    metrics: dict  # the last evaluation's metrics
    best_metric: float | None  # best value of train.early_stopping.metric
    sample: str = ""
    interrupted: bool = False  # stopped by a signal or --stop-at-step: the same command resumes it

    @property
    def val_loss(self) -> float | None:
        return self.metrics.get("val_loss")


# ---------------------------------------------------------------------------------------------- the WORKDIR


def check_resume_compatible(cfg, stored: dict, workdir) -> None:
    """Refuse, before anything is written, a config that the WORKDIR's checkpoint cannot continue."""
    # A key the stored config lacks (written before the key existed) had its default then.
    defaults = flat_paths(config_lib.base_config().to_dict(), ".")
    new, old = flat_paths(cfg.to_dict(), "."), {**defaults, **flat_paths(stored, ".")}
    changed = []
    for key in sorted(set(new)):  # keys since removed from lmtrain are no longer compared
        a, b = old.get(key), new.get(key)
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
        if a != b and not key.startswith(RESUMABLE_CHANGES):
            changed.append((key, a, b))
    if changed:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:4]) + (" ..." if len(changed) > 4 else "")
        raise config_lib.ConfigError(
            f"{workdir} holds a checkpoint trained with a different config ({listed}). A resumed run cannot change "
            f"this. Use a new --workdir; to start from this run's weights, add --config.train.init_from={workdir}."
        )


def prepare_workdir(workdir) -> None:
    """A WORKDIR that is a file, read-only, or whose checkpoints/ is a file fails here, with the fix."""
    if workdir.exists() and not workdir.is_dir():
        raise config_lib.ConfigError(f"--workdir={workdir} is a file, not a directory. Choose another WORKDIR.")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise config_lib.ConfigError(f"--workdir={workdir} cannot be created ({e.strerror}). "
                                     "Choose a WORKDIR you can write to.") from None
    if (workdir / "checkpoints").exists() and not (workdir / "checkpoints").is_dir():
        raise config_lib.ConfigError(f"{workdir / 'checkpoints'} is a file; lmtrain keeps its checkpoints in a "
                                     "directory of that name. Move the file away or choose another WORKDIR.")
    if not is_remote(workdir) and jax.process_index() == 0:
        probe = workdir / f".lmtrain-write-test-{time.time_ns()}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise config_lib.ConfigError(f"--workdir={workdir} is not writable ({e.strerror}). "
                                         "Choose a WORKDIR you can write to.") from None


def write_config(cfg, workdir) -> None:
    """Write the resolved config; a different earlier one is kept as config.<n>.json, never overwritten."""
    path = workdir / "config.json"
    text = config_lib.to_json(cfg)
    if path.exists() and path.read_text() != text:
        n = 1
        while (workdir / f"config.{n}.json").exists():
            n += 1
        atomic_write_text(workdir / f"config.{n}.json", path.read_text())
    atomic_write_text(path, text)


def _stored_config(workdir, ckpt: Checkpointer) -> dict | None:
    latest = ckpt.latest_step()
    if latest is None:
        return None
    meta = ckpt.read_meta(latest)
    if meta.get("config"):
        return meta["config"]
    path = workdir / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------- data layout


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which rows of the global batch this process feeds: slice `data_index` of `data_count` equal slices.

    Derived from the batch sharding, so that processes holding the same rows (a tensor axis that spans
    hosts) read the same data, and a mesh that would give a process scattered rows is refused.
    """

    data_index: int
    data_count: int
    batch_axes: object  # mesh axis (or axes) of the leading batch dimension

    @classmethod
    def from_mesh(cls, mesh, rules, global_batch: int) -> BatchLayout:
        axes = logical_to_spec(("batch",), rules, mesh)[0]
        sharding = NamedSharding(mesh, PartitionSpec(axes))
        rows = sorted({(s[0].start or 0, s[0].stop or global_batch)
                       for s in sharding.addressable_devices_indices_map((global_batch,)).values()})
        lo, hi = rows[0][0], rows[-1][1]
        covered = sum(b - a for a, b in rows)
        contiguous = all(rows[i][1] == rows[i + 1][0] for i in range(len(rows) - 1))
        if not contiguous or covered != hi - lo or global_batch % (hi - lo) or lo % (hi - lo):
            raise config_lib.ConfigError(
                f"mesh: process {jax.process_index()} would hold batch rows {rows}, not one contiguous slice. "
                "Put the data-parallel axes (mesh.data, mesh.fsdp) across hosts and mesh.tensor within a host.")
        return cls(lo // (hi - lo), global_batch // (hi - lo), axes)

    def sharding(self, mesh, ndim: int) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(self.batch_axes, *([None] * (ndim - 1))))


# ---------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Components:
    """What a config builds before any device memory is used: the task, the model, the parameter plan,
    the optimizer and schedule, and the pure train step (benchmarks and tests use it too)."""

    task: object
    model_def: ModelDef
    plan: ParamPlan
    tx: object
    schedule: object
    train_step: object

    @classmethod
    def from_config(cls, cfg) -> Components:
        task = make_task(cfg)
        model_def = build_model_def(task.model_config())  # a ModelDef, or T5ModelDef for model.arch='t5'
        plan = ParamPlan.for_run(cfg, model_def, task)
        tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, plan, plan.split(model_def.shapes)[0])
        train_step = make_train_step(task.loss_fn(model_def), tx, cfg.train.grad_accum, plan.layer_masks(model_def.shapes))
        return cls(task, model_def, plan, tx, schedule, train_step)


class Run:
    """Everything one training run holds; the periodic actions read and change it."""

    def __init__(self, cfg, workdir, task, model_def, mesh, layout, data, ckpt, writer, progress, step_fn, eval_fn):
        self.cfg, self.workdir, self.task, self.model_def = cfg, workdir, task, model_def
        self.mesh, self.layout, self.data, self.ckpt = mesh, layout, data, ckpt
        self.writer, self.progress, self.step_fn, self.eval_fn = writer, progress, step_fn, eval_fn
        self.prepare = lambda batch: batch  # the task's prepare(aux, batch), jitted, when it has aux
        self.state = None
        self.step = 0
        self.tokens_seen = 0
        self.last_saved: int | None = None
        self.stop_reason: str | None = None
        self.last_eval: dict = {}
        self.last_eval_sums: dict | None = None
        self.early_stopping: EarlyStopping | None = None
        self._shardings: dict[int, NamedSharding] = {}

    def global_batch(self, local: dict) -> dict:
        out = {}
        for key, value in local.items():
            ndim = np.ndim(value)
            if ndim not in self._shardings:
                self._shardings[ndim] = self.layout.sharding(self.mesh, ndim)
            global_shape = (value.shape[0] * self.layout.data_count, *value.shape[1:])
            out[key] = jax.make_array_from_process_local_data(self._shardings[ndim], value, global_shape)
        return out

    def params(self) -> dict:
        """All the model's parameters: the trainable ones and the frozen ones."""
        return ParamPlan.merge(self.state["params"], self.state.get("frozen", {}))

    def save(self, eval_metrics: dict | None) -> None:
        meta = {
            "tokens_seen": self.tokens_seen,
            "epoch": self.data.train.epoch,
            "eval": eval_metrics or {},
            "early_stopping": self.early_stopping.state() if self.early_stopping else None,
            "config": self.cfg.to_dict(),
            # Frozen parameters are not saved: they come from this base (and the seed) again on resume.
            "base": {"init_from": self.cfg.train.init_from, "which": self.cfg.train.init_from_which,
                     "frozen": bool(self.state.get("frozen"))},
        }
        meta = json.loads(json.dumps(meta, default=list))
        saved = {k: v for k, v in self.state.items() if k != "frozen"}  # rebuilt on resume, never saved
        self.ckpt.save(self.step, saved, self.data.train.get_state(), meta, eval_metrics)
        self.last_saved = self.step


def _restore_or_init(run: Run, tx, plan, rules, log) -> dict:
    """Resume from the latest good checkpoint, or initialise (and start from train.init_from). Frozen
    parameters are never in a checkpoint: they are rebuilt as they were first made (the WORKDIR's 'start'
    parameters: the seed's initialisation, overlaid with train.init_from), so a LoRA run's checkpoint holds only
    the adapters."""
    cfg, model_def, mesh = run.cfg, run.model_def, run.mesh
    init = init_state_fn(model_def, tx, cfg.train.seed, plan)
    abstract = jax.eval_shape(init)
    shardings = state_shardings(abstract, model_def, mesh, rules)
    saved = [k for k in abstract if k != "frozen"]
    restored = run.ckpt.restore_latest(abstract_with_shardings({k: abstract[k] for k in saved},
                                                               {k: shardings[k] for k in saved}))
    if restored is not None:
        frozen = start_params(cfg, model_def, abstract_with_shardings(abstract["frozen"], shardings["frozen"]))
        run.state = {**restored.state, "frozen": frozen}
        run.data.train.set_state(restored.data_state)
        run.step = restored.step
        run.tokens_seen = int(restored.meta.get("tokens_seen", 0))
        run.early_stopping.load(restored.meta.get("early_stopping"))
        run.last_eval = restored.meta.get("eval") or {}
        run.last_saved = restored.step
        log(f"lmtrain: resuming {run.workdir} from step {restored.step}")
        return shardings
    run.state = jax.jit(init, out_shardings=shardings)()
    parts = ("params", "frozen")
    if cfg.train.init_from:
        target = ParamPlan.merge(*(abstract_with_shardings(abstract[k], shardings[k]) for k in parts))
        params, fresh, unused = overlay_init_from(cfg, model_def, ParamPlan.merge(*(run.state[k] for k in parts)),
                                                  target)
        for k in parts:
            run.state[k] = _only(params, _paths(run.state[k]))
        log(f"lmtrain: starting from parameters {cfg.train.init_from}"
            + (f"; new: {', '.join(fresh)}" if fresh else "") + (f"; not used: {', '.join(unused)}" if unused else ""))
    return shardings


def all_start_params(cfg, model_def: ModelDef, shardings: dict) -> dict:
    """All the parameters training began with (trained and frozen), built afresh: the seed's initialisation, then
    every parameter train.init_from holds. The same on a fresh run and on every resume, so a task's aux is too."""
    full = ParamPlan.merge(shardings["params"], shardings["frozen"])
    target = abstract_with_shardings(jax.eval_shape(init_params_fn(model_def, cfg.train.seed)), full)
    return start_params(cfg, model_def, target)


def prepared_steps(task, model_def: ModelDef, aux, replicated):
    """(prepare(batch), eval_fn(params, batch)): the task's prepare with its aux, jitted, run before the train
    step; and the eval step run after it. aux is an argument, not a constant baked into the programs."""
    prepare = jax.jit(task.prepare)
    eval_step = task.eval_step(model_def)
    eval_jit = jax.jit(lambda params, aux_, batch: eval_step(params, task.prepare(aux_, batch)),
                       out_shardings=replicated)
    return (lambda batch: prepare(aux, batch)), (lambda params, batch: eval_jit(params, aux, batch))


def _paths(tree: dict) -> list[str]:
    return list(param_paths(tree))


def _only(params: dict, paths: list[str]) -> dict:
    flat = param_paths(params)
    return nest_paths({p: flat[p] for p in paths if p in flat})


def train(cfg, workdir, show_progress: bool | None = None, stop_at_step: int | None = None,
          on_eval=None) -> TrainResult:
    """Train (or resume) in `workdir`, local or gs://. `stop_at_step` ends this run early with a checkpoint, as
    a preemption would. `on_eval(step, metrics) -> bool` is called after each evaluation; True stops the run."""
    stop = StopSignal()
    stop.install()  # first thing: a SIGTERM during start-up is honoured, not fatal
    try:
        return _train(cfg, as_path(workdir), show_progress, stop_at_step, on_eval, stop)
    finally:
        stop.uninstall()


def _train(cfg, workdir, show_progress, stop_at_step, on_eval, stop: StopSignal) -> TrainResult:
    maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    _use_shards_tokenizer(cfg, log)
    mesh_shape = config_lib.validate(cfg, jax.device_count())
    task = make_task(cfg)
    es_cfg = cfg.train.early_stopping
    es_mode = es_cfg.mode or task.metric_mode(es_cfg.metric)

    prepare_workdir(workdir)
    lock = lock_workdir(workdir, log)  # before the Checkpointer: a refused run touches nothing of the first one's
    try:
        return _train_locked(cfg, workdir, task, mesh_shape, es_mode, show_progress, stop_at_step, on_eval, stop, log)
    finally:
        if lock is not None:
            lock.release()


def lock_workdir(workdir, log) -> DirLock | None:
    """Process 0 holds WORKDIR's lock for the whole run, so two runs never train in one WORKDIR.

    Every process learns whether it was taken (a collective, so a refused job stops on all of its processes
    rather than leaving the others waiting for process 0)."""
    lock, refusal = None, None
    if jax.process_index() == 0:
        try:
            lock = DirLock(workdir, "lmtrain train", log).acquire()
        except DirectoryInUse as e:
            refusal = e
    refused = refusal is not None
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refused:
        raise refusal or DirectoryInUse(f"{workdir} is in use by another lmtrain train (process 0 says which).")
    return lock


def _train_locked(cfg, workdir, task, mesh_shape, es_mode, show_progress, stop_at_step, on_eval, stop,
                  log) -> TrainResult:
    es_cfg = cfg.train.early_stopping
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                        best_metric=es_cfg.metric, best_mode=es_mode, checksums=cfg.checkpoint.checksums)
    try:
        stored = _stored_config(workdir, ckpt)
        if stored is not None:
            check_resume_compatible(cfg, stored, workdir)
        done = _read_done(workdir)
        if done and ckpt.latest_step() is not None and ckpt.latest_step() >= cfg.train.steps:
            log(f"lmtrain: {workdir} is complete: it finished step {done['step']} of {cfg.train.steps} "
                f"({done.get('finished', '')}). Nothing to do; raise --config.train.steps to train further.")
            return TrainResult(done["step"], None, done.get("metrics", {}), done.get("best_metric"))
        if is_main:
            write_config(cfg, workdir)
        result = _run(cfg, workdir, task, mesh_shape, ckpt, es_mode, show_progress, stop_at_step, on_eval, stop, log)
    finally:
        stop.finishing = True
        ckpt.close()
    return result


def _use_shards_tokenizer(cfg, log) -> None:
    """Train with the tokenizer shard_data --add-special-tokens saved beside the shards, when data.tokenizer_dir
    is the one it extended; the saved config then names it, so export and generate use it too."""
    if cfg.data.source != "shards" or not cfg.data.shards_dir:
        return
    extended = training_tokenizer_dir(cfg.data.shards_dir, cfg.data.tokenizer_dir)
    if extended != str(cfg.data.tokenizer_dir):
        log(f"lmtrain: data.tokenizer_dir={extended}: the tokenizer the shards were written with "
            f"({cfg.data.tokenizer_dir or 'the tokenizer'} plus the tokens of shard_data --add-special-tokens)")
        cfg.data.tokenizer_dir = extended


def _read_done(workdir) -> dict | None:
    path = workdir / DONE
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (json.JSONDecodeError, OSError):
        return None


def _run(cfg, workdir, task, mesh_shape, ckpt, es_mode, show_progress, stop_at_step, on_eval, stop, log) -> TrainResult:
    is_main = jax.process_index() == 0
    mesh = make_mesh(mesh_shape, dcn_data=cfg.mesh.dcn_data)
    rules = cfg.mesh.axis_rules
    parts = Components.from_config(cfg)
    task, model_def, plan, tx, schedule = parts.task, parts.model_def, parts.plan, parts.tx, parts.schedule
    layout = BatchLayout.from_mesh(mesh, rules, cfg.data.batch_size)
    data = task.make_data(workdir, layout.data_index, layout.data_count)
    show_progress = cfg.logging.progress_bar if show_progress is None else show_progress

    with axis_rules(mesh, rules):
        run = Run(cfg, workdir, task, model_def, mesh, layout, data, ckpt, None, None, None, None)
        es = cfg.train.early_stopping
        run.early_stopping = EarlyStopping(es.metric, es_mode, es.patience, es.min_delta)
        shardings = _restore_or_init(run, tx, plan, rules, log)
        n_train, n_frozen = plan.counts(model_def.shapes)
        log(f"lmtrain: {(n_train + n_frozen) / 1e6:.2f}M parameters" + (f" ({n_train / 1e6:.3f}M trained, "
            f"{n_frozen / 1e6:.2f}M frozen: no gradient, no optimizer state)" if n_frozen else "")
            + f", task {task.name}, mesh data={mesh_shape[0]} fsdp={mesh_shape[1]} tensor={mesh_shape[2]} "
            f"on {jax.device_count()} {jax.devices()[0].platform} device(s)")
        replicated = NamedSharding(mesh, PartitionSpec())
        run.step_fn = jax.jit(parts.train_step, in_shardings=(shardings, None),
                              out_shardings=(shardings, replicated), donate_argnums=0)
        run.eval_fn = jax.jit(task.eval_step(model_def), out_shardings=replicated)
        aux = task.init_aux(model_def, all_start_params(cfg, model_def, shardings)) if task.uses_aux() else None
        if aux is not None:
            run.prepare, run.eval_fn = prepared_steps(task, model_def, aux, replicated)
        if task.on_policy:  # the batch is sampled from the current parameters (lmtrain.tasks.base.Task.rollout)
            run.prepare = lambda batch: run.global_batch(
                task.rollout(model_def, aux, run.params(), batch, run.state["rng"], run.step))
        run.writer = metrics_lib.MetricsWriter(workdir, cfg.logging.tensorboard, enabled=is_main, resume_step=run.step)
        run.progress = metrics_lib.ProgressBar(cfg.train.steps, run.step, enabled=is_main,
                                               bar=show_progress, log_every=cfg.train.log_every)
        try:
            _loop(run, schedule, stop, stop_at_step, on_eval)
        finally:
            run.progress.close()
            run.writer.close()
            if hasattr(data.train, "close"):
                data.train.close()
        return _finish(run)


def _loop(run: Run, schedule, stop: StopSignal, stop_at_step, on_eval) -> None:
    cfg, t = run.cfg, run.cfg.train
    total = t.steps
    n_matmul = metrics_lib.matmul_params(run.model_def)
    logger = LogMetrics(t.log_every, total, metrics_lib.device_peak_flops(), schedule, run.writer, run.progress)
    evaluate = Evaluate(t.eval_every, total, t.eval_batches, run.early_stopping, on_eval)
    checkpoint = Checkpoint(cfg.checkpoint.every, total)
    agreement = HostAgreement(run.mesh, t.preemption_check_every)
    source = cfg.data.shards_dir or f"data.source={cfg.data.source}"

    while run.step < total:
        if agreement.check(run.step, stop.signal_name is not None):
            run.stop_reason = stop.signal_name or "a signal on another host"
        if stop_at_step is not None and run.step >= stop_at_step:
            run.stop_reason = run.stop_reason or f"--stop-at-step={stop_at_step}"
        if run.stop_reason:
            break
        local = next(run.data.train)
        check_batch(local, cfg.model.vocab_size, cfg.model.max_seq_len, source)
        run.state, step_metrics = run.step_fn(run.state, run.prepare(run.global_batch(local)))
        run.step += 1
        real, slots, row_len = metrics_lib.batch_tokens(local, run.layout.data_count)
        run.tokens_seen += slots
        logger.push(run.step, step_metrics, run.tokens_seen, run.data.train.epoch,
                    (real, slots, real * metrics_lib.flops_per_token(cfg.model, row_len, n_matmul)))
        is_eval, is_save = every(t.eval_every, run.step, total), every(cfg.checkpoint.every, run.step, total)
        logger.drain(run, keep_last=not (is_eval or is_save))  # step N-1's metrics, read while step N runs
        eval_metrics = evaluate(run) if is_eval else None
        if eval_metrics:
            run.last_eval = eval_metrics
        if is_save:
            checkpoint(run, eval_metrics)
    logger.drain(run, keep_last=False)
    if run.step < total and not run.stop_reason and agreement.final(stop.signal_name is not None):
        run.stop_reason = stop.signal_name or "a signal on another host"
    if run.last_saved != run.step and run.step > 0:
        run.save(None)  # the step where a signal, --stop-at-step or early stopping ended the run


def _finish(run: Run) -> TrainResult:
    cfg, workdir, is_main = run.cfg, run.workdir, jax.process_index() == 0
    es = run.early_stopping
    stopped = run.stop_reason is not None and run.step < cfg.train.steps
    run.ckpt.wait()
    sample = ""
    if stopped and not run.stop_reason.startswith(("early stopping", "on_eval")):
        if is_main:
            how = ("run the same command without --stop-at-step (or with a larger one)"
                   if run.stop_reason.startswith("--stop-at-step") else "run the same command")
            if run.last_saved is None:  # a signal during start-up: nothing trained, nothing to save
                print(f"lmtrain: stopped by {run.stop_reason} before step 1; nothing was trained, so no checkpoint "
                      "was written. To start, run the same command.", flush=True)
            else:
                print(f"lmtrain: stopped by {run.stop_reason} at step {run.step}; checkpoint saved in "
                      f"{workdir / 'checkpoints'}. To resume, {how}.", flush=True)
        return TrainResult(run.step, run.stop_reason, run.last_eval, es.best, interrupted=True)
    if is_main:
        done = {"step": run.step, "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "metrics": run.last_eval, "best_metric": es.best, "best_step": es.best_step,
                "stopped_by": run.stop_reason}
        atomic_write_text(workdir / DONE, json.dumps(done, indent=1, sort_keys=True))
        if run.stop_reason:
            print(f"lmtrain: {run.stop_reason}; stopped at step {run.step}. The best checkpoint (step "
                  f"{es.best_step}) is what `lmtrain export --which best` picks.", flush=True)
        if run.last_eval:
            print(f"lmtrain: done at step {run.step}. "
                  + ", ".join(f"{k} {v:.4g}" for k, v in run.last_eval.items() if "/" not in k))
    if cfg.train.sample_tokens and run.task.generates_text:
        sample = sample_text(run.model_def, run.params(), run.data.tokenizer, cfg.train.sample_prompt,
                             cfg.train.sample_tokens, cfg.train.seed)  # every host takes part
        if is_main:
            print(f"lmtrain: sample (prompt {cfg.train.sample_prompt!r}):\n{sample}\n", flush=True)
    if is_main:
        for path in run.task.write_eval_artifacts(run.last_eval_sums, workdir) if run.last_eval_sums else []:
            print(f"lmtrain: wrote {path}")
        if cfg.logging.loss_curve_png:
            png = metrics_lib.plot_loss_curve(workdir / "metrics.jsonl", workdir / "loss_curve.png")
            if png:
                print(f"lmtrain: loss curve {png}; TensorBoard logs in {workdir / 'tensorboard'} "
                      f"(tensorboard --logdir {workdir / 'tensorboard'})")
    return TrainResult(run.step, run.stop_reason, run.last_eval, es.best, sample)


def sample_text(model_def: ModelDef, params, tokenizer, prompt: str, n_tokens: int, seed: int) -> str:
    """A short temperature-0.8, top-p 0.95 sample from the trained model (KV-cache decoding).

    Every process calls it with the same arguments: the parameters stay sharded where they are."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    n_tokens = min(n_tokens, model_def.cfg.max_seq_len - len(ids))
    if n_tokens < 1:
        return prompt
    sampling = SamplingConfig(max_new_tokens=n_tokens, temperature=0.8, top_p=0.95, eos_id=tokenizer.eos_token_id)
    result = generate(model_def, params, [list(ids)], sampling, seed=seed)
    return tokenizer.decode(list(ids) + result.tokens[0])


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(
        prog="lmtrain train",
        description="Train (or resume) a model. Override any config field with --config.SECTION.KEY=VALUE.",
        epilog="examples:\n  lmtrain train --config=tiny --workdir=workdir/tiny\n"
               "  lmtrain train --config=gpt2_small:runlocal --workdir=runs/gpt2_cpu   # CPU-sized\n"
               "  lmtrain train --config=WORKDIR/config.json --workdir=WORKDIR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="config name in configs/ (tiny, gpt2_small, ...), NAME:ARG "
                        "(e.g. gpt2_small:runlocal), a path to a config .py, or a resolved config.json")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and the tokenizer go here (local or gs://)")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="stop cleanly with a checkpoint after this step (e.g. to fit a scheduler's time slot)")
    args, rest = parser.parse_known_args(argv)
    return args, config_lib.parse_overrides(parser, rest)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_lib.load_config(args.config)
        config_lib.apply_overrides(cfg, overrides)
        result = train(cfg, args.workdir, show_progress=False if args.no_progress else None,
                       stop_at_step=args.stop_at_step)
    except CheckpointError as e:
        print(f"lmtrain: checkpoint error: {e}", file=sys.stderr)
        return 2
    except DirectoryInUse as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return 2
    except config_lib.ConfigError as e:
        print(f"lmtrain: config error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"lmtrain: training stopped: {e}", file=sys.stderr)
        return 1
    del result
    return 0


if __name__ == "__main__":
    sys.exit(main())
