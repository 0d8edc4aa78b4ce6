"""`lmtrain train`: build everything from a config, then run the loop that trains, evaluates,
checkpoints and resumes.

The loop only orchestrates: it dispatches step N, then reads step N-1's metrics, so the device
never waits on the host. SIGTERM/SIGINT (TPU preemption) save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain import config as config_lib
from lmtrain.data.pipeline import make_data
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.parallel.mesh import make_mesh, maybe_initialize_distributed
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec
from lmtrain.train import metrics as metrics_lib
from lmtrain.train.checkpoint import Checkpointer, load_init_params
from lmtrain.train.optimizer import make_optimizer
from lmtrain.train.state import abstract_with_shardings, create_sharded_state, init_state_fn, state_shardings
from lmtrain.train.step import make_eval_step, make_train_step


class StopRequested:
    """Remembers a SIGTERM/SIGINT so the loop can checkpoint at a step boundary and exit."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, every_host: bool) -> bool:
        local = self.signal_name is not None
        if not every_host:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.array([local]))))


@dataclasses.dataclass
class TrainResult:
    step: int
    val_loss: float | None
    stopped_by: str | None
    sample: str


def _write_config(cfg, workdir: pathlib.Path) -> None:
    """Write the resolved config; a different earlier one is kept as config.<n>.json, never overwritten."""
    path = workdir / "config.json"
    text = config_lib.to_json(cfg)
    if path.exists() and path.read_text() != text:
        n = 1
        while (workdir / f"config.{n}.json").exists():
            n += 1
        path.rename(workdir / f"config.{n}.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def evaluate(eval_fn, params, data, batch_sharding, max_batches: int) -> float | None:
    """Mean validation loss (nats/token) over the validation batches."""
    total, count = 0.0, 0.0
    for batch in data.eval_batches(max_batches):
        ce, n = eval_fn(params, _global_batch(batch, batch_sharding))
        total, count = total + float(ce), count + float(n)
    return total / count if count else None


def sample_text(model_def: ModelDef, params, tokenizer, prompt: str, n_tokens: int, seed: int) -> str:
    """A short temperature-0.8, top-p 0.95 sample from the trained model (KV-cache decoding)."""
    from lmtrain.generate import SamplingConfig, generate

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    n_tokens = min(n_tokens, model_def.cfg.max_seq_len - len(ids))
    sampling = SamplingConfig(max_new_tokens=n_tokens, temperature=0.8, top_p=0.95, eos_id=tokenizer.eos_token_id)
    result = generate(model_def, jax.device_get(params), [list(ids)], sampling, seed=seed)
    return tokenizer.decode(list(ids) + result.tokens[0])


def train(cfg, workdir: str | pathlib.Path, show_progress: bool | None = None,
          stop_at_step: int | None = None) -> TrainResult:
    """Train (or resume) in `workdir`. `stop_at_step` ends this run early, with a checkpoint, as a preemption would."""
    maybe_initialize_distributed()
    mesh_shape = config_lib.validate(cfg, jax.device_count())
    workdir = pathlib.Path(workdir).resolve()
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        _write_config(cfg, workdir)

    mesh = make_mesh(mesh_shape)
    rules = cfg.mesh.axis_rules
    model_def = ModelDef(ModelConfig.from_config(cfg.model))
    data = make_data(cfg, workdir, jax.process_index(), jax.process_count())
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    batch_sharding = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules, mesh)[0], None))
    ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    show_progress = cfg.logging.progress_bar if show_progress is None else show_progress
    log = print if is_main else (lambda *a, **k: None)

    with axis_rules(mesh, rules):
        tokens_seen = 0
        latest = ckpt.latest_step()
        if latest is not None:
            abstract = jax.eval_shape(init_state_fn(model_def, tx, cfg.train.seed))
            shardings = state_shardings(abstract, model_def, mesh, rules)
            state, data_state, meta = ckpt.restore(latest, abstract_with_shardings(abstract, shardings))
            data.train.set_state(data_state)
            tokens_seen = int(meta.get("tokens_seen", 0))
            log(f"lmtrain: resuming {workdir} from step {latest}")
        else:
            state, shardings, abstract = create_sharded_state(model_def, tx, cfg.train.seed, mesh, rules)
            if cfg.train.init_from:
                target = abstract_with_shardings(abstract["params"], shardings["params"])
                state["params"] = load_init_params(cfg.train.init_from, target)
                log(f"lmtrain: starting from parameters {cfg.train.init_from}")
        n_params = model_def.num_params()
        log(f"lmtrain: {n_params / 1e6:.2f}M parameters, mesh data={mesh_shape[0]} fsdp={mesh_shape[1]} "
            f"tensor={mesh_shape[2]} on {jax.device_count()} {jax.devices()[0].platform} device(s)")

        step_fn = jax.jit(
            make_train_step(model_def, tx, schedule, cfg.train.grad_accum, cfg.train.z_loss, cfg.model.dropout > 0),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        eval_fn = jax.jit(make_eval_step(model_def), in_shardings=(shardings["params"], batch_sharding))
        result = _loop(cfg, workdir, state, step_fn, eval_fn, data, batch_sharding, ckpt, tokens_seen,
                       model_def, show_progress, is_main, stop_at_step)
    return result


def _loop(cfg, workdir, state, step_fn, eval_fn, data, batch_sharding, ckpt, tokens_seen, model_def,
          show_progress, is_main, stop_at_step) -> TrainResult:
    t_cfg = cfg.train
    total = t_cfg.steps
    step = int(jax.device_get(state["step"]))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    peak = metrics_lib.device_peak_flops()
    flops_token = metrics_lib.flops_per_token(cfg.model, cfg.data.seq_len, metrics_lib.matmul_params(model_def))
    writer = metrics_lib.MetricsWriter(workdir, cfg.logging.tensorboard, enabled=is_main)
    bar = metrics_lib.ProgressBar(total, step, enabled=show_progress and is_main)
    stop = StopRequested()
    stop.install()
    multi_host = jax.process_count() > 1
    val_loss, stopped_by, pending = None, None, None
    last_saved = step
    t_last, steps_since = time.perf_counter(), 0

    def save(at_step: int, with_val: float | None) -> None:
        meta = {"tokens_seen": tokens_seen, "val_loss": with_val, "config": cfg.to_dict()}
        ckpt.save(at_step, state, data.train.get_state(), json.loads(json.dumps(meta, default=list)), with_val)

    def drain(item) -> None:
        nonlocal t_last, steps_since
        at_step, m = item
        m = jax.device_get(m)
        if not math.isfinite(float(m["loss"])):
            raise FloatingPointError(
                f"loss is {float(m['loss'])} at step {at_step}: training diverged. Lower optimizer.lr, "
                f"raise optimizer.warmup_steps or set train.z_loss; the last good checkpoint is step {last_saved}."
            )
        steps_since += 1
        if at_step % t_cfg.log_every == 0 or at_step == total:
            now = time.perf_counter()
            tok_s = steps_since * tokens_per_step / max(now - t_last, 1e-9)
            mfu = tok_s * flops_token / (peak * jax.device_count()) if peak else None
            record = {k: float(v) for k, v in m.items()}
            record.update(tokens_seen=tokens_seen, tokens_per_s=tok_s, epoch=data.train.epoch)
            if mfu is not None:
                record["mfu"] = mfu
            writer.write(at_step, record)
            bar.update(steps_since, record["loss"], tok_s, mfu)
            t_last, steps_since = now, 0

    try:
        while step < total:
            if stop.requested(multi_host):
                stopped_by = stop.signal_name or "a signal on another host"
                break
            if stop_at_step is not None and step >= stop_at_step:
                stopped_by = f"--stop-at-step={stop_at_step}"
                break
            batch = _global_batch(next(data.train), batch_sharding)
            state, step_metrics = step_fn(state, batch)
            step += 1
            tokens_seen += tokens_per_step
            if pending is not None:
                drain(pending)  # step N-1's metrics, read while step N runs
            pending = (step, step_metrics)
            is_eval = t_cfg.eval_every and (step % t_cfg.eval_every == 0 or step == total)
            if is_eval or step % cfg.checkpoint.every == 0 or step == total:
                drain(pending)
                pending = None
            if is_eval:
                val_loss = evaluate(eval_fn, state["params"], data, batch_sharding, t_cfg.eval_batches)
                if val_loss is not None:
                    writer.write(step, {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))})
                    bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
            if step % cfg.checkpoint.every == 0 or step == total:
                save(step, val_loss if is_eval else None)
                last_saved = step
        if pending is not None:
            drain(pending)
        if stopped_by is not None and step > last_saved:
            save(step, None)
            last_saved = step
    finally:
        stop.uninstall()
        bar.close()
        ckpt.close()
        writer.close()
        if hasattr(data.train, "close"):
            data.train.close()

    sample = ""
    if stopped_by is not None:
        if is_main:
            print(f"lmtrain: stopped by {stopped_by} at step {step}; checkpoint saved in {workdir / 'checkpoints'}. "
                  "Run the same command again to resume.", flush=True)
    elif is_main:
        if val_loss is not None:
            print(f"lmtrain: done at step {step}. validation loss {val_loss:.4f}, "
                  f"perplexity {math.exp(min(val_loss, 50)):.2f}")
        if t_cfg.sample_tokens:
            sample = sample_text(model_def, state["params"], data.tokenizer, t_cfg.sample_prompt, t_cfg.sample_tokens,
                                 t_cfg.seed)
            print(f"lmtrain: sample: {sample!r}")
        if cfg.logging.loss_curve_png:
            png = metrics_lib.plot_loss_curve(workdir / "metrics.jsonl", workdir / "loss_curve.png")
            if png:
                print(f"lmtrain: loss curve {png}; TensorBoard logs in {workdir / 'tensorboard'}")
    return TrainResult(step=step, val_loss=val_loss, stopped_by=stopped_by, sample=sample)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(
        prog="lmtrain train",
        description="Train (or resume) a model. Override any config field with --config.SECTION.KEY=VALUE.",
    )
    parser.add_argument("--config", default="tiny", help="config name in configs/ (tiny, gpt2_small, ...), "
                        "a path to a config .py (optionally :ARG) or a resolved config.json")
    parser.add_argument("--workdir", default="workdir", help="checkpoints, logs and the tokenizer go here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="stop cleanly with a checkpoint after this step (e.g. to fit a scheduler's time slot)")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.optimizer.lr=1e-3")
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            parser.error(f"override {item!r} has no value; write --config.{key}=VALUE")
        overrides[key] = value
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_lib.load_config(args.config)
        config_lib.apply_overrides(cfg, overrides)
        train(cfg, args.workdir, show_progress=False if args.no_progress else None, stop_at_step=args.stop_at_step)
    except config_lib.ConfigError as e:
        print(f"lmtrain: config error: {e}", file=sys.stderr)
        return 2
    return 0
