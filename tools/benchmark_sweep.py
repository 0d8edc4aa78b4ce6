"""Measure sweep overhead: each trial's start-up (data, compilation) as a share of the trial's time, with the
real trainer.

    python tools/benchmark_sweep.py --workdir /tmp/bench_sweep                       # tiny, 3 trials of 100 steps
    python tools/benchmark_sweep.py --workdir /tmp/bench_sweep --trials 4 --steps 200 --config.data.batch_size=32

The tokenizer and shards are built once (tools/train_tokenizer.py, tools/shard_data.py on the built-in corpus)
and shared by every trial, as a real sweep should share them. Each trial is split into:
- data: the task's `make_data` call (opening and verifying shards, tokenizer checks), timed by wrapping it;
- compile: tracing, lowering and XLA compilation, summed from `jax.monitoring` duration events;
- steady steps: (steps - 1) x the median step time that metrics.jsonl's tokens_per_s gives (the first logged
  interval holds the first step's compile, so it is left out of the median);
- other: the rest (state init or restore, evaluation, checkpoint writes, the final sample and plot).
Start-up is data + compile; its share is of the trial's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class TrialTimer:
    """Wraps the trainer so each call's data set-up, compile time and wall time are recorded."""

    def __init__(self):
        import jax

        from lmtrain import sweep
        from lmtrain.train import trainer

        self.records: list[dict] = []
        self._compile = 0.0
        self._data = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        self._train = sweep.default_train_fn()
        self.data_timed = True
        if hasattr(trainer, "make_task"):  # the task seam: data comes from task.make_data
            make_task = trainer.make_task

            def timed_make_task(cfg):
                task = make_task(cfg)
                task.make_data = self._timed(task.make_data)
                return task

            trainer.make_task = timed_make_task
        elif hasattr(trainer, "make_data"):
            trainer.make_data = self._timed(trainer.make_data)
        else:  # the trainer changed its data entry point: data time is not split out
            self.data_timed = False

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._data += time.perf_counter() - start

        return timed

    def _on_event(self, name: str, duration: float, **_kwargs) -> None:
        if name in COMPILE_EVENTS:
            self._compile += duration

    def __call__(self, cfg, workdir, show_progress=None, stop_at_step=None, on_eval=None):
        self._compile = self._data = 0.0
        start = time.perf_counter()
        result = self._train(cfg, workdir, show_progress=show_progress, stop_at_step=stop_at_step, on_eval=on_eval)
        wall = time.perf_counter() - start
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        rates = [r.get("slots_per_s", r.get("tokens_per_s")) for r in _records(Path(workdir) / "metrics.jsonl")
                 if "tokens_per_s" in r]  # padded slots per second: a step computes batch_size x seq_len of them
        step_s = tokens_per_step / statistics.median(rates[1:] or rates) if rates else float("nan")
        steady = (cfg.train.steps - 1) * step_s
        startup = self._compile + (self._data if self.data_timed else 0.0)
        self.records.append({
            "workdir": str(workdir), "lr": cfg.optimizer.lr, "wall_s": wall,
            "data_s": self._data if self.data_timed else None, "compile_s": self._compile,
            "step_ms": step_s * 1e3, "steady_steps_s": steady,
            "other_s": wall - startup - steady, "startup_share": startup / wall,
        })
        return result


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def prepare_data(workdir: Path) -> tuple[Path, Path]:
    from tools import shard_data, train_tokenizer

    tok, shards = workdir / "tokenizer", workdir / "shards"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer.main(["--builtin", "--vocab-size", "4096", "--output", str(tok)])
    if not (shards / "manifest.json").exists():
        shard_data.main(["--builtin", "--tokenizer", str(tok), "--output", str(shards), "--val-fraction", "0.1"])
    return tok, shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="data, the sweep directory and the results go here")
    p.add_argument("--config", default="tiny", help="base config of every trial")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="train.steps of each trial")
    args, rest = p.parse_known_args(argv)
    from lmtrain import sweep
    from lmtrain.runtime import apply_xla_defaults

    apply_xla_defaults()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    tok, shards = prepare_data(workdir)
    cli = dict(item[len("--config."):].split("=", 1) for item in rest if item.startswith("--config."))
    sweep_dir = workdir / f"sweep_{time.strftime('%Y%m%d_%H%M%S')}"
    spec = sweep.parse_spec({
        "base_config": args.config, "sampler": "random", "pruner": "none", "n_trials": args.trials, "seed": 0,
        "overrides": {"data.source": "shards", "data.shards_dir": str(shards), "data.tokenizer_dir": str(tok),
                      "train.steps": args.steps, "train.eval_every": args.steps, "checkpoint.every": args.steps,
                      "optimizer.warmup_steps": min(10, args.steps), "train.sample_tokens": 0,
                      "logging.progress_bar": False, "logging.loss_curve_png": False},
        "params": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    }, "benchmark_sweep")
    spec.cli_overrides = cli
    timer = TrialTimer()
    start = time.perf_counter()
    sweep.run_sweep(spec, sweep_dir, train_fn=timer, log=lambda m: None)
    total = time.perf_counter() - start
    import jax

    print(f"\n{args.config}, {args.steps} steps per trial, on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s) ({jax.devices()[0].device_kind}); sweep wall time {total:.1f}s "
          f"(trials {sum(r['wall_s'] for r in timer.records):.1f}s)")
    print(f"{'trial':>5} {'wall s':>8} {'data s':>8} {'compile s':>10} {'step ms':>8} {'steps s':>8} {'other s':>8} "
          f"{'start-up':>9}")
    for i, r in enumerate(timer.records):
        data = f"{r['data_s']:.2f}" if r["data_s"] is not None else "n/a"
        print(f"{i:>5} {r['wall_s']:>8.2f} {data:>8} {r['compile_s']:>10.2f} {r['step_ms']:>8.1f} "
              f"{r['steady_steps_s']:>8.2f} {r['other_s']:>8.2f} {r['startup_share']:>8.0%}")
    out = workdir / "benchmark_sweep.json"
    out.write_text(json.dumps({"config": args.config, "steps": args.steps, "sweep_s": total,
                               "device": jax.devices()[0].device_kind, "trials": timer.records}, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
