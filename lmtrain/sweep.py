"""`lmtrain sweep`: hyperparameter search over config keys with optuna, one trainer run (WORKDIR) per trial.

    lmtrain sweep --space=space.yaml --sweep-dir=sweeps/lr [--config=tiny] [--n-trials=20] [--config.K=V ...]

The search space is a small YAML or Python file (see `load_space`). Trials are sampled by grid, random or TPE;
a trial whose intermediate validation metric is worse than its peers' is pruned (median or Hyperband); with
`cv_folds: k` every trial trains k times, once per fold, and scores the mean over folds.

The sweep directory holds the whole state: `sweep.json` (what is searched, checked on every start so two sweeps
never mix), `sweep.db` (optuna's SQLite storage), `trials/trial_NNNN/` (one WORKDIR per trial, or one per fold),
and the results: `trials.csv`, `metric_per_trial.png`, `param_importance.png`, `best_config.json` (a resolved
config for `lmtrain train --config=...`) and `best.json`. Kill it at any point and run the same command: a trial
that was running is marked failed and queued again with the same parameters and WORKDIR, so its trainer resumes
from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import difflib
import importlib.util
import io
import itertools
import json
import math
import os
import signal
import sys
import time
import types
import warnings
from collections.abc import Callable

import ml_collections
import numpy as np

from lmtrain import config as config_lib
from lmtrain.evaluate.metrics import higher_is_better
from lmtrain.locking import DirectoryInUse, DirLock
from lmtrain.paths import as_path, is_remote
from lmtrain.storage.atomic import atomic_write_bytes, atomic_write_text
from lmtrain.train import trainer
from lmtrain.train.actions import TrainingDiverged
from lmtrain.trees import flat_paths

SWEEP_VERSION = 1
# The data selection the trainer reads for cross-validation (lmtrain.config, lmtrain.data.shards): with
# cv_folds = k >= 2 the data loaders hold out fold cv_fold of the training examples (a stable hash of each
# example picks its fold) as the validation set and train on the other k - 1 folds; 0 means no cross-validation.
CV_FOLDS_KEY, CV_FOLD_KEY = "data.cv_folds", "data.cv_fold"
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("last", "best")
SPACE_FIELDS = ("base_config", "overrides", "params", "metric", "direction", "objective", "sampler", "pruner",
                "n_trials", "seed", "cv_folds")
PARAM_FIELDS = ("type", "low", "high", "log", "step", "choices", "grid")
# What two runs of one sweep must agree on; sampler, pruner, seed and n_trials may change on a resume.
IDENTITY_FIELDS = ("params", "metric", "direction", "objective", "cv_folds")
MAX_SAME_FAILURES = 3  # trials in a row failing alike: the base config or data is broken, not the parameters
RUN_DONE_FILE = "sweep_run.json"  # in a trial's (or fold's) WORKDIR once its training finished and was scored

TrainFn = Callable[..., object]


class SweepError(config_lib.ConfigError):
    """A sweep that cannot run as asked; the message names the file or key and says what to do."""


class _TrialFailed(Exception):
    """This trial cannot give a value (diverged, bad config for these parameters); the sweep goes on."""


class _Interrupted(Exception):
    """The trainer stopped on a signal; the sweep stops and a later run resumes this trial."""


# ----------------------------------------------------------------------------- the search space


@dataclasses.dataclass(frozen=True)
class Param:
    key: str  # dotted config key, e.g. optimizer.lr
    kind: str  # 'float', 'int' or 'categorical'
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    grid: tuple = ()  # the points a grid search visits for a float/int range

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)

    def grid_values(self, source: str) -> list:
        if self.kind == "categorical":
            return list(self.choices)
        if self.grid:
            return list(self.grid)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise SweepError(f"{source}: params.{self.key}: a grid search needs a finite set of values for a "
                         f"{'log-scale ' if self.log else ''}{self.kind} range; add 'grid: [...]' with the points to try.")

    def to_dict(self) -> dict:
        d = {"type": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high, log=self.log, step=self.step)
        if self.grid:
            d["grid"] = list(self.grid)
        return d


@dataclasses.dataclass
class SweepSpec:
    params: list[Param]
    source: str = "<dict>"  # the space file, for messages
    base_config: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)  # fixed config values for every trial
    cli_overrides: dict = dataclasses.field(default_factory=dict)  # --config.K=V strings
    metric: str = "val_loss"
    direction: str = "minimize"
    objective: str = "last"  # the trial's value: the metric at the last evaluation, or the best one
    sampler: dict = dataclasses.field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = dataclasses.field(default_factory=lambda: {"name": "median"})
    n_trials: int | None = None  # None: the grid's size, or 20
    seed: int = 0
    cv_folds: int = 0

    def to_dict(self) -> dict:
        return {"params": {p.key: p.to_dict() for p in self.params}, "base_config": self.base_config,
                "overrides": self.overrides, "cli_overrides": self.cli_overrides, "metric": self.metric,
                "direction": self.direction, "objective": self.objective, "sampler": self.sampler,
                "pruner": self.pruner, "n_trials": self.n_trials, "seed": self.seed, "cv_folds": self.cv_folds}


def load_space(path: str | os.PathLike) -> dict:
    """Read a search-space file: YAML (`.yaml`/`.yml`) or Python (`.py` defining `SWEEP = {...}` or `get_sweep()`).

    Example (YAML; write floats with a dot, `1.0e-4`, or PyYAML reads `1e-4` as text -- it is converted anyway)::

        base_config: tiny            # the config every trial starts from; --config overrides it
        overrides: {train.steps: 300, train.eval_every: 50}
        metric: val_loss             # what the trainer reports at each evaluation
        direction: minimize          # inferred from the metric name when left out
        sampler: tpe                 # grid, random or tpe; or {name: tpe, n_startup_trials: 5}
        pruner: median               # median, hyperband or none; or {name: median, n_warmup_steps: 100}
        n_trials: 20
        cv_folds: 0                  # k >= 2: every trial trains once per fold, scored by the mean
        params:
          optimizer.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
          optimizer.warmup_steps: {type: int, low: 0, high: 100, step: 20}
          data.batch_size: [8, 16, 32]      # a list is a categorical choice
    """
    path = as_path(path)
    if not path.exists():
        raise SweepError(f"search space file {path} does not exist.")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise SweepError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8.") from None
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: not valid YAML ({_one_line(str(e))}).") from None
    elif path.suffix == ".py":
        module_spec = importlib.util.spec_from_file_location(f"lmtrain_sweep_{path.stem}", str(path))
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as e:  # a decoding error of a file that is not UTF-8 is one too
            raise SweepError(f"{path}: line {e.lineno}: {_one_line(str(e.msg))}.") from None
        if hasattr(module, "get_sweep"):
            raw = module.get_sweep()
        elif hasattr(module, "SWEEP"):
            raw = module.SWEEP
        else:
            raise SweepError(f"{path}: a Python search space defines SWEEP = {{...}} or get_sweep().")
    else:
        raise SweepError(f"{path}: a search space is a .yaml, .yml or .py file.")
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the search space must be a mapping with a 'params' entry.")
    return raw


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _number(value, where: str) -> float:
    if isinstance(value, bool):
        raise SweepError(f"{where}: expected a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SweepError(f"{where}: expected a number, got {value!r}.") from None
    if not math.isfinite(number):  # optuna would overflow on an infinite range, or sample NaN
        raise SweepError(f"{where}: expected a finite number, got {value!r}.")
    return number


def _parse_param(key: str, raw, source: str) -> Param:
    where = f"{source}: params.{key}"
    if isinstance(raw, list | tuple):
        raw = {"type": "categorical", "choices": list(raw)}
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: give a list of choices or a mapping like {{type: float, low: 1.0e-4, high: 1.0e-2, "
                         "log: true}.")
    unknown = [k for k in raw if k not in PARAM_FIELDS]
    if unknown:
        raise SweepError(f"{where}: unknown field '{unknown[0]}'. Fields: {', '.join(PARAM_FIELDS)}.")
    kind = raw.get("type", "categorical" if "choices" in raw else None)
    if kind not in ("float", "int", "categorical"):
        raise SweepError(f"{where}: type must be float, int or categorical (got {kind!r}).")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list | tuple) or not choices:
            raise SweepError(f"{where}: a categorical parameter needs a non-empty 'choices' list.")
        return Param(key, kind, choices=tuple(choices))
    if "low" not in raw or "high" not in raw:
        raise SweepError(f"{where}: a {kind} range needs 'low' and 'high'.")
    low, high = _number(raw["low"], f"{where}.low"), _number(raw["high"], f"{where}.high")
    if not low < high:
        raise SweepError(f"{where}: low ({raw['low']}) must be below high ({raw['high']}).")
    log = bool(raw.get("log", False))
    if log and low <= 0:
        raise SweepError(f"{where}: a log-scale range needs low > 0 (got {raw['low']}).")
    step = _number(raw["step"], f"{where}.step") if raw.get("step") is not None else None
    if step is not None and step <= 0:  # 0 was taken as 1, a negative step failed inside optuna
        raise SweepError(f"{where}.step: must be positive (got {raw['step']}); leave it out for a continuous range.")
    if log and step is not None:
        raise SweepError(f"{where}: optuna takes either log or step, not both.")
    grid = tuple(_number(v, f"{where}.grid") for v in raw.get("grid", ()))
    if any(not low <= v <= high for v in grid):
        raise SweepError(f"{where}: every grid point must lie in [low, high] = [{low}, {high}].")
    if kind == "int":
        if any(not float(v).is_integer() for v in (low, high, step or 1, *grid)):
            raise SweepError(f"{where}: an int range needs whole numbers for low, high, step and grid.")
        low, high, step = int(low), int(high), int(step) if step is not None else None
        grid = tuple(int(v) for v in grid)
    return Param(key, kind, low, high, log, step, grid=grid)


def parse_spec(raw: dict, source: str = "<dict>") -> SweepSpec:
    """Check a search-space mapping (as `load_space` returns it) field by field; config keys are checked later."""
    unknown = [k for k in raw if k not in SPACE_FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], SPACE_FIELDS, n=2)
        hint = f" Did you mean: {', '.join(close)}?" if close else f" Fields: {', '.join(SPACE_FIELDS)}."
        raise SweepError(f"{source}: unknown field '{unknown[0]}'.{hint}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{source}: 'params' must map config keys (like optimizer.lr) to their ranges or choices.")
    spec = SweepSpec(params=[_parse_param(str(k), v, source) for k, v in params.items()], source=source)
    spec.base_config = str(raw.get("base_config", spec.base_config))
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{source}: 'overrides' must map config keys to values.")
    spec.overrides = {str(k): v for k, v in overrides.items()}
    spec.metric = str(raw.get("metric", spec.metric))
    direction = raw.get("direction")
    if direction is None:
        better = higher_is_better(spec.metric)
        if better is None:
            raise SweepError(f"{source}: cannot tell whether a higher '{spec.metric}' is better; "
                             "add 'direction: minimize' or 'direction: maximize'.")
        direction = "maximize" if better else "minimize"
    if direction not in ("minimize", "maximize"):
        raise SweepError(f"{source}: direction must be minimize or maximize (got {direction!r}).")
    spec.direction = direction
    spec.objective = str(raw.get("objective", spec.objective))
    if spec.objective not in OBJECTIVES:
        raise SweepError(f"{source}: objective must be one of {', '.join(OBJECTIVES)} (got {spec.objective!r}).")
    spec.sampler = _named(raw.get("sampler", "tpe"), SAMPLERS, "sampler", source)
    spec.pruner = _named(raw.get("pruner", "median"), PRUNERS, "pruner", source)
    n_trials = raw.get("n_trials")
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 1):
        raise SweepError(f"{source}: n_trials must be a positive integer (got {n_trials!r}).")
    spec.n_trials = n_trials
    spec.seed = int(raw.get("seed", 0))
    spec.cv_folds = int(raw.get("cv_folds", 0) or 0)
    if spec.cv_folds == 1 or spec.cv_folds < 0:
        raise SweepError(f"{source}: cv_folds must be 0 (no cross-validation) or at least 2 (got {spec.cv_folds}).")
    for p in spec.params:
        if p.key in (CV_FOLDS_KEY, CV_FOLD_KEY):
            raise SweepError(f"{source}: params.{p.key} is set by the sweep itself; use 'cv_folds: k' instead.")
    if spec.sampler["name"] == "grid":
        for p in spec.params:
            p.grid_values(source)
    return spec


def _named(value, allowed: tuple[str, ...], what: str, source: str) -> dict:
    """'tpe' or {name: tpe, option: ...} -> {'name': 'tpe', ...}."""
    d = {"name": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else None
    if d is None or d.get("name") not in allowed:
        raise SweepError(f"{source}: {what} must be one of {', '.join(allowed)} "
                         f"(or a mapping with 'name:'), got {value!r}.")
    return d


# ----------------------------------------------------------------------------- configs


def _leaf_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += _leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _lookup(cfg: ml_collections.ConfigDict, dotted: str, where: str):
    """(parent node, leaf name) of a config key; an unknown key is an error that suggests close ones."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            node = None
            break
        node = node[part]
    if node is None or leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        leaves = _leaf_keys(cfg)
        close = difflib.get_close_matches(dotted, leaves, n=3, cutoff=0.6)
        close += [k for k in leaves if k.rsplit(".", 1)[-1] == leaf and k not in close][:3]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SweepError(f"{where}: unknown config key '{dotted}' (not in the base config).{hint}")
    return node, leaf


def _coerce(current, value, where: str):
    """`value` as the type of the config field it replaces (YAML gives '1e-4' as text, ints for floats...)."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise SweepError(f"{where}: the config key is true/false; got {value!r}.")
    if isinstance(current, int):
        number = _number(value, where)
        if not number.is_integer():
            raise SweepError(f"{where}: the config key is an integer; got {value!r}.")
        return int(number)
    if isinstance(current, float):
        return _number(value, where)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise SweepError(f"{where}: the config key is text; got {value!r}.")
        return value
    raise SweepError(f"{where}: only number, text and true/false config keys can be searched or set here.")


def set_key(cfg: ml_collections.ConfigDict, dotted: str, value, where: str) -> None:
    node, leaf = _lookup(cfg, dotted, where)
    node[leaf] = _coerce(node[leaf], value, f"{where} ({dotted})")


def resolve_base_config(spec: SweepSpec) -> ml_collections.ConfigDict:
    """The config every trial starts from: the base config, the space's overrides, then --config.K=V."""
    cfg = config_lib.load_config(spec.base_config)
    for key, value in spec.overrides.items():
        set_key(cfg, key, value, f"{spec.source}: overrides.{key}")
    config_lib.apply_overrides(cfg, spec.cli_overrides)
    return cfg


def validate_space(spec: SweepSpec, base: ml_collections.ConfigDict) -> SweepSpec:
    """Check every searched key against the base config and convert choices to its types."""
    params = []
    for p in spec.params:
        where = f"{spec.source}: params.{p.key}"
        node, leaf = _lookup(base, p.key, where)
        current = node[leaf]
        if p.kind == "categorical":
            choices = tuple(_coerce(current, c, where) for c in p.choices)
            params.append(dataclasses.replace(p, choices=choices))
            continue
        if isinstance(current, bool) or not isinstance(current, int | float):
            raise SweepError(f"{where}: the config key holds {type(current).__name__}; search it with a list of choices.")
        if isinstance(current, int) and p.kind == "float":
            raise SweepError(f"{where}: the config key is an integer; use 'type: int'.")
        params.append(p)
    spec.params = params
    return spec


def trial_config(base: ml_collections.ConfigDict, params: dict, source: str = "trial") -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        set_key(cfg, key, value, source)
    return cfg


# ----------------------------------------------------------------------------- the sweep directory


def _identity(spec: SweepSpec, base: ml_collections.ConfigDict) -> dict:
    d = spec.to_dict()
    return {"config": json.loads(config_lib.to_json(base)), **{k: d[k] for k in IDENTITY_FIELDS}}


def _differences(old: dict, new: dict) -> list[str]:
    a, b = flat_paths(old, "."), flat_paths(new, ".")
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


SWEEP_LOCK = "sweep.lock"


@contextlib.contextmanager
def _sweep_lock(sweep_dir: str):
    """One process per sweep directory (lmtrain.locking: the OS drops the lock when the process dies)."""
    try:
        lock = DirLock(sweep_dir, "lmtrain sweep", name=SWEEP_LOCK).acquire()
    except DirectoryInUse as e:
        raise SweepError(str(e)) from None
    try:
        yield
    finally:
        lock.release()


def _check_sweep_dir(sweep_dir: str, identity: dict) -> list[str] | None:
    """None for a new sweep (the directory must hold nothing else); else how the stored sweep differs from this one."""
    meta_path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.exists(meta_path):
        others = [n for n in os.listdir(sweep_dir) if n != SWEEP_LOCK]
        if others:
            raise SweepError(f"sweep directory {sweep_dir} is not empty and holds no sweep ({', '.join(sorted(others)[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); choose a new or empty directory.")
        return None
    try:
        stored = json.loads(open(meta_path).read())
    except json.JSONDecodeError as e:
        raise SweepError(f"{meta_path}: unreadable ({e}); this directory's sweep cannot be resumed.") from None
    return _differences(stored.get("identity", {}), identity)


def _write_sweep_json(sweep_dir: str, spec: SweepSpec, identity: dict) -> None:
    doc = {"version": SWEEP_VERSION, "spec": spec.to_dict(), "source": spec.source, "identity": identity,
           "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    atomic_write_text(os.path.join(sweep_dir, "sweep.json"), json.dumps(doc, indent=2, sort_keys=True, default=list) + "\n")


def _another_sweep_error(sweep_dir: str, diffs: list[str]) -> SweepError:
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    return SweepError(f"sweep directory {sweep_dir} holds another sweep (its base config or search space differs: "
                      f"{shown}). Use a new --sweep-dir, or resume this one with its own space "
                      "(lmtrain sweep --sweep-dir=DIR).")


def spec_from_sweep_dir(sweep_dir: str) -> SweepSpec:
    """The spec a sweep was started with, to resume it without its space file."""
    meta_path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.exists(meta_path):
        raise SweepError(f"{sweep_dir} holds no sweep (no sweep.json); start one with --space=FILE.")
    doc = json.loads(open(meta_path).read())
    raw = dict(doc["spec"])
    cli = raw.pop("cli_overrides", {})
    spec = parse_spec(raw, doc.get("source", meta_path))
    spec.cli_overrides = cli
    return spec


# ----------------------------------------------------------------------------- trials


def default_train_fn() -> TrainFn:
    """The real trainer: train(cfg, workdir, show_progress=..., on_eval=...) -> TrainResult."""
    return trainer.train


@dataclasses.dataclass
class _Context:
    spec: SweepSpec
    base: ml_collections.ConfigDict
    sweep_dir: str
    train_fn: TrainFn
    log: Callable[[str], None]
    study: object = None


def _run_once(ctx: _Context, cfg, workdir: str, trial, report_steps: bool, history: dict[int, float]) -> float:
    """Train one config in `workdir` (resuming whatever is there) and return its metric value.

    `history` holds values an earlier, killed attempt reported; a finished run's result file short-cuts it all.
    """
    import optuna

    done = as_path(workdir) / RUN_DONE_FILE
    if done.exists():
        return float(json.loads(done.read_text())["value"])
    metric, values, pruned = ctx.spec.metric, dict(history), []

    def on_eval(step: int, metrics: dict) -> bool:
        if metric not in metrics:
            raise SweepError(f"{ctx.spec.source}: metric '{metric}' is not among the validation metrics the trainer "
                             f"reports ({', '.join(sorted(metrics))}); set 'metric:' to one of them.")
        value = float(metrics[metric])
        values[int(step)] = value
        if report_steps:
            _report(trial, value, int(step))
            if trial.should_prune():
                pruned.append(int(step))
                return True
        return False

    try:
        result = ctx.train_fn(cfg, workdir, show_progress=False, on_eval=on_eval)
    except (FloatingPointError, TrainingDiverged) as e:
        raise _TrialFailed(f"diverged: {e}") from None
    except SweepError:
        raise
    except config_lib.ConfigError as e:  # e.g. warmup longer than the steps for these parameters
        raise _TrialFailed(f"config error: {e}") from None
    if pruned:
        raise optuna.TrialPruned(f"pruned at step {pruned[0]} ({metric}={values[pruned[0]]:.4g})")
    if result.interrupted:  # a signal or --stop-at-step: the same command resumes it
        raise _Interrupted(str(result.stopped_by))
    last_metrics = getattr(result, "metrics", None) or {}
    if ctx.spec.objective == "best" and values:
        pick = min if ctx.spec.direction == "minimize" else max
        value = pick(values.values())
    elif metric in last_metrics:
        value = float(last_metrics[metric])
    elif values:
        value = values[max(values)]
    else:
        raise _TrialFailed(f"the trainer reported no '{metric}' (no evaluation ran); set train.eval_every > 0.")
    if not math.isfinite(value):
        raise _TrialFailed(f"{metric} is {value}: the run diverged.")
    done.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done, json.dumps({"value": value, "step": getattr(result, "step", None),
                                        "metrics": {k: float(v) for k, v in last_metrics.items()}}) + "\n")
    return value


def _report(trial, value: float, step: int) -> None:
    # A resumed trainer re-evaluates steps its killed attempt already reported (after the last checkpoint);
    # optuna keeps the first value and warns, and exact resume makes them equal anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial.report(value, step)


def _trial_workdir(sweep_dir: str, trial) -> str:
    """The trial's WORKDIR: a resumed trial's from sweep.db, which must lie under SWEEP_DIR/trials (the trainer
    writes there and prunes old checkpoints there: a name from a file must never lead it elsewhere)."""
    trials_dir = os.path.join(sweep_dir, "trials")
    stored = trial.user_attrs.get("workdir")
    if not stored:
        return os.path.join(trials_dir, f"trial_{trial.number:04d}")
    inside = os.path.realpath(trials_dir)
    if not isinstance(stored, str) or os.path.commonpath([inside, os.path.realpath(stored)]) != inside or \
            os.path.realpath(stored) == inside:
        raise SweepError(f"{os.path.join(sweep_dir, 'sweep.db')}: trial {trial.number}'s workdir {stored!r} is not "
                         f"inside {trials_dir}; lmtrain only trains (and deletes old checkpoints) there. Resume the "
                         "sweep where it was created, or start a new one.")
    return stored


def _objective(ctx: _Context, trial) -> float:
    import optuna

    params = {p.key: p.suggest(trial) for p in ctx.spec.params}
    workdir = _trial_workdir(ctx.sweep_dir, trial)
    trial.set_user_attr("workdir", workdir)
    try:
        cfg = trial_config(ctx.base, params, f"trial {trial.number}")
    except SweepError as e:
        raise _TrialFailed(str(e)) from None
    if not ctx.spec.cv_folds:
        history = {}
        if "retry_of" in trial.user_attrs:
            history = dict(ctx.study.trials[trial.user_attrs["retry_of"]].intermediate_values)
            for step, value in sorted(history.items()):
                _report(trial, value, step)  # the pruner sees the whole curve, not only what follows the resume
        return _run_once(ctx, cfg, workdir, trial, True, history)

    k, fold_values = ctx.spec.cv_folds, []
    for fold in range(k):
        fold_cfg = copy.deepcopy(cfg)
        set_key(fold_cfg, CV_FOLDS_KEY, k, "cv")
        set_key(fold_cfg, CV_FOLD_KEY, fold, "cv")
        fold_values.append(_run_once(ctx, fold_cfg, os.path.join(workdir, f"fold_{fold}"), trial, False, {}))
        trial.set_user_attr("fold_values", fold_values)
        mean = float(np.mean(fold_values))
        trial.report(mean, fold)  # the pruner compares trials fold by fold
        if fold < k - 1 and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after fold {fold} (mean {ctx.spec.metric}={mean:.4g})")
    trial.set_user_attr("cv_std", float(np.std(fold_values)))
    return float(np.mean(fold_values))


def _make_sampler(spec: SweepSpec, seed: int, sampler_override: str | None):
    import optuna

    options = dict(spec.sampler) if not sampler_override else {"name": sampler_override}
    name = options.pop("name")
    try:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **options)
        # grid points are queued up front (see run_sweep); anything beyond them is drawn at random
        return optuna.samplers.RandomSampler(seed=seed, **options)
    except TypeError as e:
        raise SweepError(f"{spec.source}: sampler {name}: {e}.") from None


def _make_pruner(spec: SweepSpec, base, pruner_override: str | None):
    import optuna

    options = dict(spec.pruner) if not pruner_override else {"name": pruner_override}
    name = options.pop("name")
    try:
        if name == "median":
            options.setdefault("n_startup_trials", 3)
            return optuna.pruners.MedianPruner(**options)
        if name == "hyperband":
            # The resource is the step the trainer evaluated at, or the fold index under cross-validation.
            if spec.cv_folds:
                options.setdefault("min_resource", 1)
                options.setdefault("max_resource", spec.cv_folds)
            else:
                options.setdefault("min_resource", max(int(base.train.eval_every or 1), 1))
                options.setdefault("max_resource", int(base.train.steps))
            options.setdefault("reduction_factor", 3)
            return optuna.pruners.HyperbandPruner(**options)
        return optuna.pruners.NopPruner()
    except TypeError as e:
        raise SweepError(f"{spec.source}: pruner {name}: {e}.") from None


def _counts_toward_budget(t) -> bool:
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and "interrupted" not in t.user_attrs


def _requeue_interrupted(study, storage, log) -> None:
    """Trials left RUNNING by a kill (or stopped by a signal) are failed and queued again, same params and WORKDIR."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "interrupted", "killed")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and "interrupted" in t.user_attrs):
            continue
        if t.number in retried:
            continue
        attrs = {"retry_of": t.number}
        if "workdir" in t.user_attrs:
            attrs["workdir"] = t.user_attrs["workdir"]
        study.enqueue_trial(t.params, user_attrs=attrs)
        log(f"sweep: trial {t.number} was interrupted; queued again to resume in {t.user_attrs.get('workdir', 'a new WORKDIR')}")


def run_sweep(spec: SweepSpec, sweep_dir: str | os.PathLike, train_fn: TrainFn | None = None,
              n_trials: int | None = None, sampler: str | None = None, pruner: str | None = None,
              log: Callable[[str], None] = print) -> object:
    """Run (or resume) the sweep in `sweep_dir` until it has `n_trials` finished trials; write the results.

    `train_fn(cfg, workdir, show_progress=..., on_eval=...)` trains one config; tests pass a fake.
    Returns the optuna study.
    """
    import optuna

    if is_remote(sweep_dir):
        raise SweepError(f"--sweep-dir={sweep_dir}: the sweep's SQLite storage needs a local directory.")
    sweep_dir = str(as_path(sweep_dir))
    base = resolve_base_config(spec)
    spec = validate_space(spec, base)
    train_fn = train_fn or default_train_fn()
    os.makedirs(sweep_dir, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _sweep_lock(sweep_dir):
        identity = _identity(spec, base)
        diffs = _check_sweep_dir(sweep_dir, identity)
        if diffs is None:
            _write_sweep_json(sweep_dir, spec, identity)  # before the database: a sweep.db always has its sweep.json
        storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(sweep_dir, 'sweep.db')}")
        study = optuna.create_study(storage=storage, study_name="lmtrain", direction=spec.direction,
                                    load_if_exists=True)
        if diffs:
            if study.trials:
                raise _another_sweep_error(sweep_dir, diffs)
            # Killed before its first trial: nothing was trained, so the sweep may be re-specified.
            optuna.delete_study(study_name="lmtrain", storage=storage)
            _write_sweep_json(sweep_dir, spec, identity)
            study = optuna.create_study(storage=storage, study_name="lmtrain", direction=spec.direction)
        # A resumed sampler must not replay the draws of the first run: seed it by how far the sweep got.
        study.sampler = _make_sampler(spec, spec.seed + len(study.trials), sampler)
        study.pruner = _make_pruner(spec, base, pruner)
        if (sampler or spec.sampler["name"]) == "grid" and not study.user_attrs.get("grid_queued"):
            grid = list(itertools.product(*(p.grid_values(spec.source) for p in spec.params)))
            for values in grid:
                study.enqueue_trial(dict(zip((p.key for p in spec.params), values)))
            study.set_user_attr("grid_queued", len(grid))
        _requeue_interrupted(study, storage, log)
        budget = n_trials or spec.n_trials or study.user_attrs.get("grid_queued") or 20
        ctx = _Context(spec, base, sweep_dir, train_fn, log, study)
        failures: list[str] = []
        stopped = False
        with _stop_on_signal() as stop:
            while sum(_counts_toward_budget(t) for t in study.get_trials(deepcopy=False)) < budget:
                if stop.signal_name:
                    log(f"sweep: stopped by {stop.signal_name} between trials; run the same command to resume.")
                    stopped = True
                    break
                state, error = _run_trial(ctx, study)
                if state == "stop":
                    stopped = True
                    break
                failures = failures + [error] if state == "failed" else []
                if len(failures) >= MAX_SAME_FAILURES and len(set(failures[-MAX_SAME_FAILURES:])) == 1:
                    write_results(study, spec, base, sweep_dir, log)
                    raise SweepError(f"{MAX_SAME_FAILURES} trials in a row failed with the same error, which the "
                                     f"search space does not explain: {error}")
        write_results(study, spec, base, sweep_dir, log)
        if not stopped:
            _check_some_trial_succeeded(study, spec, sweep_dir)
    return study


def _check_some_trial_succeeded(study, spec: SweepSpec, sweep_dir: str) -> None:
    """A sweep whose every trial failed found nothing: that is an error, not a result (the errors may differ
    trial by trial, as a config error naming each trial's value does, so the same-error rule misses it)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if not trials or any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
        return
    last = next((t.user_attrs["error"] for t in reversed(trials) if "error" in t.user_attrs), "no error recorded")
    raise SweepError(f"all {len(trials)} trials failed, so no '{spec.metric}' was measured; the last one: "
                     f"{_one_line(last)} (every error is in {os.path.join(sweep_dir, 'trials.csv')}).")


@contextlib.contextmanager
def _stop_on_signal():
    """SIGTERM/SIGINT between trials end the sweep after the current trial (the trainer handles them inside one)."""
    state = types.SimpleNamespace(signal_name=None)

    def handle(signum, _frame):
        state.signal_name = signal.Signals(signum).name

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run_trial(ctx: _Context, study) -> tuple[str, str]:
    """Ask, train, tell one trial. Returns ('done' | 'failed' | 'stop', error text); 'stop' when a signal
    reached the trainer."""
    import optuna
    from optuna.trial import TrialState

    trial = study.ask()
    start = time.perf_counter()
    try:
        value = _objective(ctx, trial)
    except optuna.TrialPruned as e:
        study.tell(trial, state=TrialState.PRUNED)
        ctx.log(f"sweep: trial {trial.number} {e} after {time.perf_counter() - start:.1f}s")
        return "done", ""
    except _TrialFailed as e:
        trial.set_user_attr("error", str(e)[:2000])
        study.tell(trial, state=TrialState.FAIL)
        ctx.log(f"sweep: trial {trial.number} failed: {e}")
        return "failed", str(e)
    except _Interrupted as e:
        trial.set_user_attr("interrupted", str(e))
        study.tell(trial, state=TrialState.FAIL)
        ctx.log(f"sweep: trial {trial.number} stopped by {e}; run the same command to resume it.")
        return "stop", ""
    except BaseException as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
        if not isinstance(e, SweepError):
            trial.set_user_attr("interrupted", type(e).__name__)  # resumable: not the trial's fault
        study.tell(trial, state=TrialState.FAIL)
        raise
    study.tell(trial, value)
    std = trial.user_attrs.get("cv_std")
    shown = f"{value:.4g}" + (f" ± {std:.2g} over {ctx.spec.cv_folds} folds" if std is not None else "")
    ctx.log(f"sweep: trial {trial.number} {ctx.spec.metric}={shown} ({_fmt_params(trial.params)}) "
            f"in {time.perf_counter() - start:.1f}s")
    return "done", ""


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ----------------------------------------------------------------------------- results


def trial_rows(study, spec: SweepSpec) -> list[dict]:
    """One row per trial: number, state, value (mean over folds), std, last step reported, params, time, WORKDIR."""
    rows = []
    retried_by = {t.user_attrs["retry_of"]: t.number for t in study.trials if "retry_of" in t.user_attrs}
    for t in study.trials:
        state = t.state.name.lower()
        if "interrupted" in t.user_attrs:
            state = f"interrupted (retried as #{retried_by[t.number]})" if t.number in retried_by else "interrupted"
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        row = {"trial": t.number, "state": state, spec.metric: value,
               "std": t.user_attrs.get("cv_std"),
               "last_step": max(t.intermediate_values) if t.intermediate_values else None}
        row.update({p.key: t.params.get(p.key) for p in spec.params})
        row["seconds"] = round(t.duration.total_seconds(), 1) if t.duration else None
        row["workdir"] = t.user_attrs.get("workdir", "")
        row["error"] = t.user_attrs.get("error", "")
        if not spec.cv_folds:
            row.pop("std")
        rows.append(row)
    return rows


def format_table(rows: list[dict], best: int | None) -> str:
    if not rows:
        return "(no trials)"
    cols = [c for c in rows[0] if c not in ("workdir", "error")]

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = [[("*" if r["trial"] == best else "") + cell(r[c]) if c == "trial" else cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_metric_per_trial(study, spec: SweepSpec) -> bytes:
    """Left: each trial's value (pruned trials at their last report), the best so far, and fold std. Right: the
    intermediate curves the pruner compared."""
    from matplotlib.figure import Figure
    from optuna.trial import TrialState

    fig = Figure(figsize=(11, 4))
    ax, ax_curves = fig.subplots(1, 2)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if done:
        ax.errorbar([t.number for t in done], [t.value for t in done],
                    yerr=[t.user_attrs.get("cv_std", 0.0) for t in done] if spec.cv_folds else None,
                    fmt="o", color="tab:blue", label="complete", capsize=3)
        pick = min if spec.direction == "minimize" else max
        best, xs, ys = None, [], []
        for t in done:
            best = t.value if best is None else pick(best, t.value)
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    if pruned:
        ax.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                "x", color="tab:red", label="pruned (last report)")
    ax.set(xlabel="trial", ylabel=spec.metric, title=f"{spec.metric} per trial ({spec.direction})")
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend()
    for t in study.trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            style = {"color": "tab:red", "alpha": 0.5, "linestyle": "--"} if t.state == TrialState.PRUNED else {}
            ax_curves.plot(steps, [t.intermediate_values[s] for s in steps], marker=".", **style)
    ax_curves.set(xlabel="fold" if spec.cv_folds else "step",
                  ylabel=f"mean {spec.metric} over folds so far" if spec.cv_folds else spec.metric,
                  title="Intermediate values (pruned dashed)")
    ax_curves.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def param_importances(study) -> dict[str, float] | None:
    """Parameter importances by optuna's PED-ANOVA evaluator; None with fewer than 2 distinct complete trials.

    PED-ANOVA needs no scikit-learn (optuna's fANOVA does) and is deterministic. It compares the parameter
    distribution of the best trials with all of them; the best share is widened for small sweeps so it
    holds about 5 trials rather than one or two.
    """
    import optuna
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if (len(done) < 2 or len({json.dumps(t.params, sort_keys=True, default=str) for t in done}) < 2
            or len({t.value for t in done}) < 2):
        return None
    quantile = max(0.1, min(0.5, 5 / len(done)))
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile))
    except (RuntimeError, ValueError):
        return None


def plot_importance(importances: dict[str, float], spec: SweepSpec, n_complete: int) -> bytes:
    from matplotlib.figure import Figure

    names = list(importances)[::-1]
    fig = Figure(figsize=(6.4, 0.6 + 0.45 * len(names)))
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(importances[n], i, f" {importances[n]:.2f}", va="center")
    ax.set(xlabel=f"importance for {spec.metric} (PED-ANOVA, sums to 1)", xlim=(0, 1.1),
           title=f"Parameter importance (from {n_complete} complete trials)")
    fig.tight_layout()
    return _png(fig)


def write_results(study, spec: SweepSpec, base, sweep_dir: str, log: Callable[[str], None] = print) -> dict:
    """trials.csv, the plots, best_config.json and best.json; print the table. Returns best.json's content."""
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best_trial = study.best_trial if done else None
    rows = trial_rows(study, spec)
    log(format_table(rows, best_trial.number if best_trial else None))
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(os.path.join(sweep_dir, "trials.csv"), buf.getvalue())
    atomic_write_bytes(os.path.join(sweep_dir, "metric_per_trial.png"), plot_metric_per_trial(study, spec))
    importances = param_importances(study)
    if importances:
        atomic_write_bytes(os.path.join(sweep_dir, "param_importance.png"), plot_importance(importances, spec, len(done)))
    summary = {"trials": len(rows), "complete": len(done),
               "pruned": sum(t.state == TrialState.PRUNED for t in study.trials), "importance": importances}
    if best_trial is None:
        log(f"sweep: no complete trial yet; results in {sweep_dir}")
        atomic_write_text(os.path.join(sweep_dir, "best.json"), json.dumps(summary, indent=2) + "\n")
        return summary
    cfg = trial_config(base, best_trial.params, "best trial")
    if spec.cv_folds:
        set_key(cfg, CV_FOLDS_KEY, 0, "best config")  # train the winner on all the data
    config_path = os.path.join(sweep_dir, "best_config.json")
    atomic_write_text(config_path, config_lib.to_json(cfg) + "\n")
    summary.update(best_trial=best_trial.number, value=best_trial.value, std=best_trial.user_attrs.get("cv_std"),
                   metric=spec.metric, params=best_trial.params, workdir=best_trial.user_attrs.get("workdir"),
                   config=config_path)
    atomic_write_text(os.path.join(sweep_dir, "best.json"), json.dumps(summary, indent=2) + "\n")
    std = best_trial.user_attrs.get("cv_std")
    shown = f"{best_trial.value:.4g}" + (f" ± {std:.2g}" if std is not None else "")
    log(f"sweep: best trial {best_trial.number}: {spec.metric}={shown} ({_fmt_params(best_trial.params)})")
    log(f"sweep: {len(rows)} trials ({summary['complete']} complete, {summary['pruned']} pruned); "
        f"table {os.path.join(sweep_dir, 'trials.csv')}, plots in {sweep_dir}")
    log(f"sweep: train the best config: lmtrain train --config={config_path} --workdir=WORKDIR")
    return summary


def write_results_only(spec: SweepSpec, sweep_dir: str) -> None:
    """Rewrite the table, plots and best config of an existing sweep without running a trial."""
    import optuna

    db = os.path.join(sweep_dir, "sweep.db")
    if not os.path.exists(db):
        raise SweepError(f"{sweep_dir} holds no sweep results yet (no sweep.db); run the sweep first.")
    base = resolve_base_config(spec)
    spec = validate_space(spec, base)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    write_results(optuna.load_study(study_name="lmtrain", storage=f"sqlite:///{db}"), spec, base, sweep_dir)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(
        prog="lmtrain sweep",
        description="Search hyperparameters: one training run per trial, pruned on the validation metric. "
                    "Run the same command again to resume.")
    parser.add_argument("--space", help="search space (.yaml or .py); leave out to resume the sweep in --sweep-dir")
    parser.add_argument("--sweep-dir", required=True, help="the sweep's state, trial WORKDIRs and results")
    parser.add_argument("--config", help="base config (overrides the space file's base_config)")
    parser.add_argument("--n-trials", type=int, help="finished trials to reach (0: only rewrite the results)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="override the space file's sampler")
    parser.add_argument("--pruner", choices=PRUNERS, help="override the space file's pruner")
    parser.add_argument("--cv-folds", type=int, help="k-fold cross-validation: every trial trains k times, once per "
                        "held-out fold, and scores the mean (overrides the space file's cv_folds; 0: off)")
    args, rest = parser.parse_known_args(argv)
    return args, config_lib.parse_overrides(parser, rest)


def main(argv: list[str] | None = None, train_fn: TrainFn | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.space:
            raw = load_space(args.space)
            if args.cv_folds is not None:
                raw = {**raw, "cv_folds": args.cv_folds}
            spec = parse_spec(raw, str(args.space))
            if args.config:
                spec.base_config = args.config
            spec.cli_overrides = overrides
        else:
            spec = spec_from_sweep_dir(str(as_path(args.sweep_dir)))
            if args.config or overrides or args.cv_folds is not None:
                raise SweepError("--config, --cv-folds and --config.K=V need --space (they define a sweep); "
                                 "to resume, give only --sweep-dir.")
        if args.n_trials == 0:
            write_results_only(spec, str(as_path(args.sweep_dir)))
            return 0
        run_sweep(spec, args.sweep_dir, train_fn=train_fn, n_trials=args.n_trials, sampler=args.sampler,
                  pruner=args.pruner)
    except config_lib.ConfigError as e:
        print(f"lmtrain: sweep error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
